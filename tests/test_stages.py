"""The stage scheduler on Kaplan et al.'s law and on measured curves."""

import numpy as np
import pytest

from bigsci_jax.scaling import stages


@pytest.mark.parametrize("params", [1e7, 1e8, 1e9])
def test_width_constant_is_about_e_across_sizes(params):
  stage = stages.kaplan_stage(params, "width")
  assert stage.constant == pytest.approx(2.72, abs=0.01)
  assert stages.kaplan_slope(params, stage.growth_steps) == pytest.approx(-0.0475, abs=1e-6)
  # The target really reaches the growth loss S_g / c steps in.
  assert stages.kaplan_loss(4 * params, stage.growth_steps / stage.constant) == pytest.approx(
      stage.growth_loss, rel=1e-9)


def test_depth_grows_earlier_and_saves_compute():
  width, depth = stages.kaplan_stage(1e8, "width"), stages.kaplan_stage(1e8, "depth")
  assert 1.0 < depth.constant < width.constant
  assert depth.growth_steps < width.growth_steps  # its threshold is steeper
  assert 0 < width.compute_saving < 1 and 0 < depth.compute_saving < 1
  with pytest.raises(ValueError, match="unknown growth operator"):
    stages.kaplan_stage(1e8, "sideways")


def test_measured_curve_finds_the_same_growth_point():
  """A curve logged from the Kaplan law (what metrics.jsonl holds) gives the growth
  step the closed form gives."""
  n = 1e8
  steps = np.exp(np.linspace(np.log(100), np.log(1e6), 400))
  flops, loss = stages.kaplan_compute(n, steps), stages.kaplan_loss(n, steps)
  i = stages.measured_growth_step(flops, loss, "width", window=0.2)
  expected = stages.kaplan_stage(n, "width").growth_steps
  assert steps[i] == pytest.approx(expected, rel=0.05)
  assert stages.measured_growth_step(flops[:50], loss[:50], "width", window=0.2) is None


def test_stages_command_prints_json(capsys):
  import json
  from bigsci_jax.scaling.__main__ import main
  assert main(["stages", "--op", "depth", "--params", "1e8"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["constant"] == pytest.approx(stages.kaplan_stage(1e8, "depth").constant)
