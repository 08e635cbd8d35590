"""The Debian Administrator's Handbook corpus (the real installed package)."""

import os
import re

import pytest

from bigsci_jax import corpus


@pytest.fixture(scope="module")
def root():
  return corpus.handbook_root()


def test_missing_corpus_is_one_sentence(tmp_path):
  with pytest.raises(corpus.CorpusError, match=r"apt-get install -y debian-handbook"):
    corpus.handbook_root(str(tmp_path))


def test_chapters_are_the_same_in_every_locale(root):
  english = [c for c, _ in corpus.chapters(root, "en-US")]
  assert len(english) >= 15
  for locale in ("fr-FR", "ja-JP", "ar-MA"):
    assert [c for c, _ in corpus.chapters(root, locale)] == english


def test_untranslated_paragraphs_are_dropped(root):
  chapters = {"apt.html", "packaging-system.html"}
  english = corpus.english_paragraphs(root, chapters)
  french = [p for d in corpus.documents(root, "fr-FR", english, chapters) for p in d["text"].split("\n")]
  assert french and not set(french) & english
  # A mostly untranslated locale keeps only a small part of its pages' paragraphs.
  kept = sum(len(d["text"]) for d in corpus.documents(root, "da-DK", english, chapters))
  everything = sum(len(d["text"]) for d in corpus.documents(root, "da-DK", frozenset(), chapters))
  assert kept < 0.5 * everything
  english_docs = list(corpus.documents(root, "en-US", english, chapters))
  assert english_docs and all(d["lang"] == "en" for d in english_docs)


def test_code_listings_are_skipped(root):
  page = os.path.join(root, "en-US", "apt.html")
  listing = re.search(r"<pre[^>]*>(.*?)</pre>", open(page, encoding="utf-8").read(), re.S).group(1)
  line = next(l for l in re.sub(r"<[^>]+>", "", listing).splitlines() if len(l.strip()) > 20).strip()
  assert not any(line in p for p in corpus.paragraphs(page))


def test_language_codes():
  all_locales = ["fr-FR", "zh-CN", "zh-TW", "pt-BR"]
  assert [corpus.lang_code(l, all_locales) for l in all_locales] == ["fr", "zh_cn", "zh_tw", "pt"]


def test_fourteen_languages_are_really_translated(root):
  kept = corpus.translated_locales(root)
  assert len(kept) == 14 and "zh-CN" in kept and "da-DK" not in kept, kept


def test_sentencepiece_round_trips_every_language(root, tmp_path):
  import sentencepiece as spm
  from bigsci_jax import vocab
  chapters = {"apt.html", "packaging-system.html"}
  english = corpus.english_paragraphs(root, chapters)
  texts = {}
  for locale in corpus.translated_locales(root):
    docs = list(corpus.documents(root, locale, english, chapters))
    texts[docs[0]["lang"]] = [d["text"] for d in docs]
  cfg = vocab.VocabConfig(vocab_size=4000, sample_chars=400_000)
  path = vocab.train(texts, str(tmp_path), cfg)
  assert vocab.train(texts, str(tmp_path), cfg) == path  # cached by its inputs and settings
  sp = spm.SentencePieceProcessor(model_file=path)
  assert sp.pad_id() == 0 and sp.eos_id() == 1
  for lang, docs in texts.items():
    for text in docs[:3]:
      assert sp.decode(sp.encode(text)) == text, lang
  assert sp.decode(sp.encode("unseen: 🦜 ǅ")) == "unseen: 🦜 ǅ"  # byte fallback
  # Temperature sampling: alpha = 0 gives each language the same share of the sample.
  french_paragraphs = {p for d in texts["fr"] for p in d.split("\n")}
  sample = vocab.training_sample({"en": texts["en"], "fr": texts["fr"]},
                                 vocab.VocabConfig(alpha=0.0, sample_chars=20_000))
  french = sum(len(line) for line in sample if line in french_paragraphs)
  assert 0.4 < french / sum(map(len, sample)) < 0.6
