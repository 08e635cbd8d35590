"""Built-in offline multiple-choice tasks and harness-style scoring."""

import jax
import numpy as np
import pytest

from bigsci_jax import likelihood, mc_tasks
from bigsci_jax.config import ModelConfig
from bigsci_jax.corpus import CorpusError
from bigsci_jax.model import Transformer, init_params


def _bytes(text):
  return [b + 3 for b in text.encode()]  # byte-level ids above pad / eos / unk


def test_next_sentence_items_come_from_test_chapters():
  items = mc_tasks.next_sentence_items("fr", limit=60)
  assert len(items) == 60
  for item in items:
    assert len(set(item.choices)) == mc_tasks.CHOICES and 0 <= item.answer < mc_tasks.CHOICES
  answers = np.bincount([i.answer for i in items], minlength=4)
  assert answers.min() >= 5  # the true sentence is not always in the same slot
  assert mc_tasks.next_sentence_items("fr", limit=60) == items  # fixed seed


def test_translation_items_pair_aligned_paragraphs():
  pairs = mc_tasks.aligned_paragraphs("de")
  assert len(pairs) >= 20 and all(en != de for en, de in pairs)
  items = mc_tasks.translation_items("de", shots=2, limit=30)
  for item in items:
    assert item.context.count("English: ") == 3 and item.context.endswith("\nTranslation:")
    source = item.context.rsplit("English: ", 1)[1].removesuffix("\nTranslation:")
    assert dict(pairs)[source] == item.choices[item.answer][1:]
  with pytest.raises(CorpusError, match="unknown language 'xx'"):
    mc_tasks.translation_items("xx")


def test_scoring_picks_the_highest_loglik_and_normalises_per_byte():
  items = [mc_tasks.Item("c", (" a", " bbbb", " cc", " d"), 1)] * 3
  logliks = [-4.0, -6.0, -5.0, -4.5] * 3  # per byte: -2, -1.2, -1.67, -2.25
  result = mc_tasks.score(items, lambda requests: logliks)
  assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["items"] == 3


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_an_untrained_model_scores_at_chance(mask):
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=259, max_len=512,
                    dtype="float32", mask=mask)
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))
  fn = likelihood.make_loglik_fn(model, params, _bytes, seq_len=512, batch_size=40)
  for items in (mc_tasks.next_sentence_items("en", limit=200),
                mc_tasks.translation_items("fr", shots=1, limit=100)):
    result = mc_tasks.score(items, fn)
    n = len(items)
    half_width = 1.96 * np.sqrt(0.25 * 0.75 / n)
    for name in ("acc", "acc_norm"):
      assert abs(result[name] - 0.25) <= half_width, (name, result)


def test_loglik_counts_only_the_continuation_and_truncates_context_from_the_left():
  rows = likelihood.request_rows([("abcdef", "gh")], _bytes, seq_len=5, prefix_lm=True)
  assert list(rows["decoder_target_tokens"][0]) == _bytes("defgh")
  assert list(rows["decoder_loss_weights"][0]) == [0, 0, 0, 1, 1]
  assert list(rows["decoder_causal_attention"][0]) == [1, 1, 1, 1, 0]
  assert list(rows["decoder_input_tokens"][0]) == [0] + _bytes("defg")
  with pytest.raises(likelihood.LikelihoodError, match="context window is 5"):
    likelihood.request_rows([("a", "bcdefgh")], _bytes, seq_len=5)
