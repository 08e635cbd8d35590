"""Metric definitions."""

import math

import pytest

from bigsci_jax.metrics import bits_per_byte


def test_bits_per_byte_hand_computed():
  # A uniform model over 256 tokens, one token per byte, spends exactly 8 bits per byte.
  assert bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
  # "héllo" is 6 UTF-8 bytes: 2 tokens at ln 8 nats each = 6 bits over 6 bytes = 1 bit/byte.
  assert bits_per_byte(2 * math.log(8), len("héllo".encode())) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    bits_per_byte(1.0, 0)
