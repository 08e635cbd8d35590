"""Parameter and FLOP accounting against figures computable by hand."""

import pytest

from bigsci_jax import flops
from bigsci_jax.config import ModelConfig

GPT3_175B = ModelConfig(num_layers=96, d_model=12288, num_heads=96, d_ff=4 * 12288,
                        vocab_size=50257, max_len=2048)


def test_gpt3_175b_parameters_and_six_n():
  counts = flops.param_counts(GPT3_175B)
  assert counts.total == pytest.approx(175e9, rel=0.01)
  assert counts.non_embedding == pytest.approx(12 * 96 * 12288 ** 2, rel=0.001)
  kaplan = flops.flops_per_token(GPT3_175B, 2048, "kaplan", attention=False)
  assert kaplan == 6 * counts.non_embedding
  # Op-by-op counting adds the attention context, softmax and the output head: a few percent.
  chinchilla = flops.flops_per_token(GPT3_175B, 2048, "chinchilla")
  assert 1.0 < chinchilla / (6 * counts.total) < 1.05


def test_porian_counts_the_head_and_kaplan_does_not():
  small = ModelConfig(num_layers=4, d_model=256, num_heads=4, vocab_size=50304)
  counts = flops.param_counts(small)
  k = flops.flops_per_token(small, 1024, "kaplan")
  p = flops.flops_per_token(small, 1024, "porian")
  assert p - k == 6 * counts.head
  # For a small model the head is a large share of compute (Porian et al.'s first correction).
  assert counts.head > 0.5 * counts.non_embedding


def test_chinchilla_appendix_f_by_hand():
  """Hoffmann et al. appendix F, term by term, for a small multi-head model."""
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, d_ff=256, vocab_size=1000,
                    use_bias=False)
  t, d, v, f, h, k = 128, 64, 1000, 256, 4, 16
  forward = (2 * v * d
             + 2 * (2 * 3 * d * h * k + 2 * t * h * k + 3 * h * t + 2 * t * h * k + 2 * h * k * d
                    + 2 * 2 * d * f)
             + 2 * d * v)
  assert flops.flops_per_token(cfg, t, "chinchilla") == 3 * forward


def test_unknown_convention_and_peaks():
  with pytest.raises(ValueError, match="convention='palm'"):
    flops.flops_per_token(GPT3_175B, 2048, "palm")
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("cpu") is None
