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


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 24])
def test_utf8_check_names_the_first_bad_byte_whatever_the_read_size(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(corpus, "_UTF8_CHUNK", chunk)
  corpus._check_utf8.cache_clear()
  path = tmp_path / "bad.txt"
  path.write_bytes("é".encode() * 5 + b"\xc3\x28 after\n")  # a cut two-byte character at 10
  with pytest.raises(corpus.CorpusError, match=r"bad.txt is not valid UTF-8 \(byte 10\)"):
    corpus.text_files(str(tmp_path))
  path.write_bytes("é".encode() * 5 + b"\xc3")  # cut at the end of the file
  with pytest.raises(corpus.CorpusError, match=r"\(byte 10\)"):
    corpus.text_files(str(tmp_path))


def test_utf8_check_reruns_when_a_file_changes(tmp_path):
  path = tmp_path / "train" / "part.txt"
  path.parent.mkdir()
  path.write_text("un texte correct\n", encoding="utf-8")
  assert corpus.text_files(str(tmp_path)) == {"train": [str(path)]}
  path.write_bytes(b"now \xff broken\n")  # same path, new size: checked again
  with pytest.raises(corpus.CorpusError, match=r"part.txt is not valid UTF-8 \(byte 4\)"):
    corpus.text_files(str(tmp_path))
