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
