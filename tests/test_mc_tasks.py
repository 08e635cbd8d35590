"""Built-in offline multiple-choice tasks and harness-style scoring."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from bigsci_jax import generate, likelihood, mc_tasks
from bigsci_jax.config import ModelConfig
from bigsci_jax.corpus import CorpusError
from bigsci_jax.model import Transformer, init_params


class Bytes:
  """A byte-level tokenizer: ids above pad / eos / unk; rows start from pad."""

  bos_id, eos_id, vocab_size = 0, 1, 259

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


_bytes = Bytes().encode


def _tiny(mask="causal", max_len=512, seed=0):
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=259,
                    max_len=max_len, dtype="float32", mask=mask)
  model = Transformer(cfg)
  return model, init_params(model, jax.random.key(seed))


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
    assert dict(pairs)[source] == item.choices[item.answer] and item.delimiter == " "
  with pytest.raises(CorpusError, match="unknown language 'xx'"):
    mc_tasks.translation_items("xx")


def test_scoring_picks_the_highest_loglik_and_normalises_per_byte():
  items = [mc_tasks.Item("c", ("a", "bbbb", "cc", "d"), 1)] * 3
  logliks = [-4.0, -6.0, -5.0, -4.5] * 3  # per byte of the choice: -4, -1.5, -2.5, -4.5
  asked = []
  result = mc_tasks.score(items, lambda requests: asked.extend(requests) or logliks)
  assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["items"] == 3
  assert asked[:2] == [("c", " a"), ("c", " bbbb")]  # delimiter + choice
  items = items + [mc_tasks.Item("c", ("a", "bbbb", "cc", "d"), 0)]
  kept = mc_tasks.score(items, lambda requests: logliks + [-4.0, -6.0, -5.0, -4.5], True)
  assert [list(kept["outcomes"][k]) for k in ("acc", "acc_norm")] == [[0, 0, 0, 1], [1, 1, 1, 0]]
  assert kept["acc"] == kept["outcomes"]["acc"].mean() == 0.25


def test_a_paired_gain_is_the_mean_difference_with_the_error_of_the_differences():
  """Of 200 items, `after` gets 30 right that `before` got wrong and 10 wrong that it got
  right, and agrees on the other 160: the gain is 0.1 and its error comes from the 40
  disagreements alone, well under the error of the two scores taken as independent."""
  before = np.random.default_rng(0).random(200) < 0.5
  after = before.copy()
  after[np.flatnonzero(~before)[:30]], after[np.flatnonzero(before)[:10]] = True, False
  gain = mc_tasks.paired_gain({"acc": before, "acc_norm": before}, {"acc": after})
  assert set(gain) == {"acc", "acc_stderr"}  # only the metrics both have
  assert gain["acc"] == pytest.approx(0.1)
  # the differences: +1 on 30 items, -1 on 10, 0 on 160; their sample variance / n
  assert gain["acc_stderr"] == pytest.approx(np.sqrt((40 - 200 * 0.1 ** 2) / 199 / 200))
  independent = np.hypot(*(np.sqrt(x.mean() * (1 - x.mean()) / 199) for x in (before, after)))
  assert gain["acc_stderr"] < 0.7 * independent
  assert mc_tasks.paired_gain({"acc": before}, {"acc": before}) == {"acc": 0.0, "acc_stderr": 0.0}
  with pytest.raises(ValueError, match="200 outcomes before and 199 after"):
    mc_tasks.paired_gain({"acc": before}, {"acc": after[1:]})


def test_cloze_items_end_before_their_last_word():
  items = mc_tasks.cloze_items("de", limit=50)
  assert len(items) == 50 and len(set(items)) == 50
  for item in items:
    assert item.word.isalpha() and not item.context.endswith(" ")
  with pytest.raises(CorpusError, match="does not separate words"):
    mc_tasks.cloze_items("ja")
  assert mc_tasks.first_word(" Paket, und") == "Paket" and mc_tasks.first_word("  ") == ""


def test_word_choice_items_offer_words_of_the_paragraph_and_train_chapters_differ():
  items = mc_tasks.word_choice_items("fr", limit=40)
  words = {c.context: c.word for c in mc_tasks.cloze_items("fr", limit=None)}
  assert len(items) == 40
  for item in items:
    assert len(set(item.choices)) == mc_tasks.CHOICES
    assert item.choices[item.answer] == words[item.context]
    assert all(re.search(rf"\b{re.escape(w)}\b", item.context) for w in item.choices
               if w != words[item.context])
  assert np.bincount([i.answer for i in items], minlength=4).min() >= 3
  train = mc_tasks.word_choice_items("fr", limit=None, split="train")
  assert len(train) > 3 * len(mc_tasks.word_choice_items("fr", limit=None))
  assert not {i.context for i in train} & {i.context for i in items}


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_an_untrained_model_scores_at_chance(mask):
  model, params = _tiny(mask)
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=512, batch_size=40)

  def fn(requests):
    return scorer.loglikelihood(requests)[0]
  for items in (mc_tasks.next_sentence_items("en", limit=200),
                mc_tasks.translation_items("fr", shots=1, limit=100)):
    result = mc_tasks.score(items, fn)
    n = len(items)
    half_width = 1.96 * np.sqrt(0.25 * 0.75 / n)
    for name in ("acc", "acc_norm"):
      assert abs(result[name] - 0.25) <= half_width, (name, result)


def test_loglik_counts_only_the_continuation_and_truncates_context_from_the_left():
  rows = likelihood.token_rows([(_bytes("abcdef"), _bytes("gh"))], width=5, prefix_lm=True)
  assert list(rows["decoder_target_tokens"][0]) == _bytes("defgh")
  assert list(rows["decoder_loss_weights"][0]) == [0, 0, 0, 1, 1]
  assert list(rows["decoder_causal_attention"][0]) == [1, 1, 1, 1, 0]
  assert list(rows["decoder_input_tokens"][0]) == [0] + _bytes("defg")
  with pytest.raises(likelihood.LikelihoodError, match="context window is 5"):
    likelihood.token_rows([(_bytes("a"), _bytes("bcdefgh"))], width=5)
  assert likelihood.split_pair("Answer: ", "Paris") == ("Answer:", " Paris")


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_batched_bucketed_scores_equal_one_request_at_a_time(mask):
  """Sorting by length, padding chunks and row widths of 32 / 64 / ... change nothing:
  each request alone in a full-window row gives the same log-likelihood."""
  model, params = _tiny(mask, max_len=128)
  requests = [("The quick brown fox", " jumps"), ("", "x"), ("a" * 70, " over the lazy dog"),
              ("Debian", " GNU/Linux"), ("zz", " top"), ("é ü", " ñ")]
  batched, _ = likelihood.Scorer(model, params, Bytes(), seq_len=128, batch_size=4).loglikelihood(
      requests)
  one = likelihood.Scorer(model, params, Bytes(), seq_len=128, batch_size=1)
  for request, value in zip(requests, batched):
    context, continuation = likelihood.split_pair(*request)
    rows = likelihood.token_rows([(_bytes(context), _bytes(continuation))], 128, mask == "prefix")
    single = np.asarray(one._score(params, rows)[0])[0]
    assert value == pytest.approx(single, abs=1e-4)


def test_greedy_flag_agrees_with_cached_generation():
  """A continuation the KV-cache decoder generated greedily is greedy for the full
  forward pass; the same with its last token changed is not."""
  model, params = _tiny(seed=3)
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=512, batch_size=4)
  contexts = ["Debian is", "The package", "apt-get install", "Le paquet"]
  generated = generate.generate(model, params, [_bytes(c) for c in contexts], 4)
  pairs = [(_bytes(c), g) for c, g in zip(contexts, generated)]
  pairs += [(c, g[:-1] + [3 + (g[-1] - 3 + 1) % 256]) for c, g in pairs]
  values, greedy = scorer.score_tokens(pairs)
  assert list(greedy) == [True] * 4 + [False] * 4
  # Logits 5 columns at a time (ModelConfig.logits_chunk): the same scores and flags.
  chunked = likelihood.Scorer(Transformer(dataclasses.replace(model.cfg, logits_chunk=5)), params,
                              Bytes(), seq_len=512, batch_size=4).score_tokens(pairs)
  np.testing.assert_allclose(chunked[0], values, rtol=1e-6)
  assert list(chunked[1]) == list(greedy)


def test_rolling_loglikelihood_scores_every_token_once():
  tokens = list(range(10))
  pairs = likelihood.windows(tokens, 0, window=4)
  assert [t for _, cont in pairs for t in cont] == tokens
  for context, cont in pairs:  # the tokens right before the scored ones, as many as fit
    start = tokens.index(cont[0])
    assert len(context) + len(cont) <= 4 and context == tokens[start - len(context):start]
  model, params = _tiny(max_len=64)
  text = "Debian GNU/Linux est un système d'exploitation libre."
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=64, batch_size=2)
  whole, _ = scorer.loglikelihood([("", text)])
  assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(whole[0], abs=1e-4)
  windows = likelihood.Scorer(model, params, Bytes(), seq_len=16, batch_size=2)
  rolled = windows.loglikelihood_rolling([text, text[:10]])
  expected = [sum(windows.score_tokens(likelihood.windows(_bytes(t), 0, 16))[0])
              for t in (text, text[:10])]
  np.testing.assert_allclose(rolled, expected, rtol=1e-6)
  # A continuation longer than the window is scored in pieces after its context.
  long_cont, _ = windows.loglikelihood([("Debian", " " + text)])
  pieces = likelihood.windows(_bytes("Debian " + text), len(_bytes("Debian")), 16)
  assert [t for _, c in pieces for t in c] == _bytes(" " + text) and len(pieces) > 3
  assert long_cont[0] == pytest.approx(sum(windows.score_tokens(pieces)[0]), rel=1e-6)


def test_generate_until_cuts_at_stop_strings_and_keeps_the_window():
  model, params = _tiny(max_len=64, seed=5)
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=64, batch_size=2)
  free = scorer.generate_until(["Debian ", "apt"], (), 12)
  assert all(len(_bytes(t)) <= 12 for t in free)
  assert len(free[0]) >= 5
  stop = free[0][3:5]
  cut = scorer.generate_until(["Debian ", "apt"], (stop,), 12)
  assert cut[0] == free[0][:free[0].index(stop)] and stop not in cut[0]
  long_context = scorer.generate_until(["x" * 200], (), 8)  # left-truncated, with a warning
  assert len(long_context) == 1


def test_generation_draws_only_the_tokenizers_ids_from_a_larger_model_vocabulary():
  """A model's vocabulary may be larger than its tokenizer's (a round size, or
  DataConfig.vocab_size below ModelConfig.vocab_size): ids past the tokenizer are
  never drawn, however likely the model makes them."""
  cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=300,
                    max_len=64, dtype="float32", tie_embeddings=False)
  model = Transformer(cfg)
  params = init_params(model, jax.random.key(0))
  norm = params["final_norm"]
  params["final_norm"] = {"scale": np.zeros_like(norm["scale"]), "bias": np.ones_like(norm["bias"])}
  head = np.zeros_like(params["head"])  # every position's logits: 32 for id 290, 16 for "a"
  head[:, 290], head[:, _bytes("a")[0]] = 1.0, 0.5
  params["head"] = head
  scorer = likelihood.Scorer(model, params, Bytes(), seq_len=64, batch_size=2)
  assert scorer.generate_until(["Debian", "apt"], (), 4) == ["aaaa", "aaaa"]
