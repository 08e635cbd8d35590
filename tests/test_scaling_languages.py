"""A language plan on the embedded corpus, end to end: plan -> run -> mixture rates and the
transfer matrix."""

import csv
import json
import os

import pytest

from bigsci_jax.config import BatchConfig, DataConfig, MeshConfig, ModelConfig, RunConfig, TrainConfig
from bigsci_jax.metrics import read_metrics
from bigsci_jax.scaling.__main__ import main as scaling_main


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _base(tmp_path, data_dir, languages):
  base = RunConfig(model=ModelConfig(vocab_size=1024, max_len=512, d_model=32, d_ff=64,
                                     num_layers=2, num_heads=2, dtype="float32"),
                   batch=BatchConfig(batch_size=4, seq_len=32), mesh=MeshConfig(1, 1, 1),
                   data=DataConfig(mixture="handbook_multilingual", languages=languages,
                                   data_dir=data_dir, vocab_size=1000),
                   train=TrainConfig(eval_batches=2))
  path = tmp_path / "base.json"
  path.write_text(json.dumps(base.to_dict()))
  return str(path)


def _plan_and_run(tmp_path, capsys, data_dir, languages, tokens, source_tokens, pairs=None):
  pytest.importorskip("seqio")
  out = str(tmp_path / "plan")
  args = ["plan-languages", "--languages", *languages, "--tokens", *map(str, tokens),
          "--source_tokens", str(source_tokens), "--base", _base(tmp_path, data_dir, languages),
          "--out", out]
  assert scaling_main(args + (["--pairs", *pairs] if pairs else [])) == 0
  planned = _last_json(capsys)["runs"]
  assert scaling_main(["run", "--plan", out, "--no_progress"]) == 0
  result = _last_json(capsys)
  assert result["runs"] == planned
  with open(result["languages_csv"]) as f:
    by_language = list(csv.DictReader(f))
  with open(result["transfer_csv"]) as f:
    transfer = list(csv.DictReader(f))
  return out, result, by_language, transfer


@pytest.mark.slow  # 40 s; the mixture and transfer fits have fast tests of their own
def test_a_two_language_plan_gives_laws_rates_and_transfer(tmp_path, capsys, handbook_data_dir):
  out, result, by_language, transfer = _plan_and_run(
      tmp_path, capsys, handbook_data_dir, ("en", "fr"), (256, 768, 2304), 2304, ["en:fr"])
  assert len(by_language) == 6 and len(transfer) == 9  # 6 target-only + 3 from en
  for row in by_language:  # tokens are exact (whole steps); loss = that run's own evaluation
    i = sorted({r["tokens"] for r in by_language if r["language"] == row["language"]},
               key=float).index(row["tokens"])
    final = read_metrics(os.path.join(out, "runs", f"mono_{row['language']}_{i}"), "eval")[-1]
    assert float(row["loss"]) == pytest.approx(final[f"loss/{row['language']}"])
    steps = read_metrics(os.path.join(out, "runs", f"mono_{row['language']}_{i}"), "train")
    assert float(row["tokens"]) == steps[-1]["tokens_seen"] == {0: 256, 1: 768, 2: 2304}[i]
  ft = {float(r["tokens"]): float(r["loss"]) for r in transfer if r["source"] == "en"}
  mono = {float(r["tokens"]): float(r["loss"]) for r in by_language if r["language"] == "fr"}
  assert ft[256] < mono[256]  # 2304 tokens of English first: French starts ahead
  sizes = json.load(open(result["sizes_json"]))
  assert set(sizes) == {"en", "fr"} and all(v > 1e4 for v in sizes.values())

  assert scaling_main(["mixture", "--runs", result["languages_csv"], "--budget", "1e5",
                       "--sizes", result["sizes_json"]]) == 0
  mixture = _last_json(capsys)
  assert set(mixture["rates"]) == {"en", "fr"}
  assert sum(mixture["rates"].values()) == pytest.approx(1.0)
  assert 0 <= mixture["alpha"] <= 2
  assert scaling_main(["transfer", "--runs", result["transfer_csv"]]) == 0
  matrix = _last_json(capsys)
  assert matrix["sources"] == ["en"] and matrix["targets"] == ["fr"]
  assert os.path.exists(os.path.join(out, "transfer.json")) and os.path.exists(matrix["plot"])


@pytest.mark.slow
def test_three_languages_three_amounts_each(tmp_path, capsys, handbook_data_dir):
  out, result, by_language, transfer = _plan_and_run(
      tmp_path, capsys, handbook_data_dir, ("en", "fr", "de"), (512, 2048, 8192), 8192)
  assert len(by_language) == 9 and len(transfer) == 9 + 18
  for lang in ("en", "fr", "de"):  # more data, lower loss
    losses = [float(r["loss"]) for r in sorted((r for r in by_language if r["language"] == lang),
                                               key=lambda r: float(r["tokens"]))]
    assert losses == sorted(losses, reverse=True), (lang, losses)
  for objective in ("mean", "max"):
    assert scaling_main(["mixture", "--runs", result["languages_csv"], "--budget", "1e6",
                         "--sizes", result["sizes_json"], "--objective", objective]) == 0
    rates = _last_json(capsys)["rates"]
    assert set(rates) == {"en", "fr", "de"} and sum(rates.values()) == pytest.approx(1.0)
  assert scaling_main(["transfer", "--runs", result["transfer_csv"]]) == 0
  matrix = _last_json(capsys)
  assert matrix["sources"] == matrix["targets"] == ["de", "en", "fr"]
  assert len(matrix["pairs"]) == 6
  assert os.path.getsize(matrix["plot"]) > 5000
