"""The embedded multilingual corpus: the Debian Administrator's Handbook.

Debian's `debian-handbook` package installs the same book in 26 locales as HTML
under /usr/share/doc/debian-handbook/html/<locale>/. Only some locales are really
translated; a paragraph identical to an en-US paragraph is untranslated and is
dropped from non-English languages, so the language list follows from the data.
Code listings (<pre>) are skipped. One document = one HTML page (a section), in
the chapter the book's table of contents puts it.

Pure Python (no TensorFlow): the TFDS builder and the tests read it.
"""

import codecs
import functools
import glob
import html.parser
import os
import re

HANDBOOK_HTML = "/usr/share/doc/debian-handbook/html"
ENGLISH = "en-US"
_BLOCKS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "td", "th", "div"}
_SKIP = {"pre", "script", "style", "head"}
_CONTENT = {"chapter", "section", "preface", "appendix"}
_SPACES = re.compile(r"\s+")
_UTF8_CHUNK = 1 << 24


class CorpusError(ValueError):
  """The corpus cannot be read; the message says what is missing and what to do."""


def handbook_root(root=None):
  """The folder holding <locale>/index.html, or one sentence on how to get it."""
  root = root or os.environ.get("BIGSCI_HANDBOOK_HTML", HANDBOOK_HTML)
  if not os.path.isfile(os.path.join(root, ENGLISH, "index.html")):
    raise CorpusError(
        f"the Debian Administrator's Handbook was not found at {root} (no {ENGLISH}/index.html): "
        f"install it with `apt-get install -y debian-handbook`, or set BIGSCI_HANDBOOK_HTML to a "
        f"folder of <locale>/index.html pages.")
  return root


def locales(root):
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "index.html")))


class _Toc(html.parser.HTMLParser):
  """Chapters in book order: [(chapter_file, [page files])] from index.html's TOC."""

  def __init__(self):
    super().__init__()
    self.chapters, self._kind = [], None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "span":
      self._kind = attrs.get("class")
    elif tag == "a" and self._kind and "href" in attrs:
      page = attrs["href"].split("#")[0]
      if self._kind in ("chapter", "preface", "appendix"):
        self.chapters.append((page, [page]))
      elif self._kind == "section" and self.chapters and page not in self.chapters[-1][1]:
        self.chapters[-1][1].append(page)


class _Text(html.parser.HTMLParser):
  """Block-level text of a page's body, one string per paragraph.

  Text counts only inside the page's content (the first chapter / section / preface
  / appendix <div>), so banners and navigation are left out, as
  are the in-page table of contents and code listings (<pre>).
  """

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.blocks, self._parts, self._pre = [], [], 0
    self._depth, self._content_at, self._toc_at = 0, None, None

  def _close_block(self):
    text = _SPACES.sub(" ", "".join(self._parts)).strip()
    if text:
      self.blocks.append(text)
    self._parts = []

  def handle_starttag(self, tag, attrs):
    if tag == "div":
      self._depth += 1
      attrs = dict(attrs)
      classes = (attrs.get("class") or "").split()
      if self._content_at is None and ("lang" in attrs or _CONTENT & set(classes)):
        self._content_at = self._depth
      elif self._toc_at is None and "toc" in classes:
        self._toc_at = self._depth
    if tag in _SKIP:
      self._pre += 1
    elif tag in _BLOCKS:
      self._close_block()

  def handle_endtag(self, tag):
    if tag in _SKIP:
      self._pre = max(0, self._pre - 1)
    elif tag in _BLOCKS:
      self._close_block()
    if tag == "div":
      if self._toc_at == self._depth:
        self._toc_at = None
      if self._content_at == self._depth:
        self._close_block()
        self._content_at = None
      self._depth -= 1

  def handle_data(self, data):
    if self._content_at is not None and self._toc_at is None and not self._pre:
      self._parts.append(data)


def chapters(root, locale):
  toc = _Toc()
  with open(os.path.join(root, locale, "index.html"), encoding="utf-8") as f:
    toc.feed(f.read())
  return toc.chapters


def paragraphs(path):
  parser = _Text()
  with open(path, encoding="utf-8") as f:
    parser.feed(f.read())
  parser.close()
  return parser.blocks


def lang_code(locale, all_locales):
  """'fr-FR' -> 'fr'; the full locale ('zh_tw') where two locales share a language."""
  language = locale.split("-")[0].lower()
  if sum(1 for other in all_locales if other.split("-")[0].lower() == language) > 1:
    return locale.lower().replace("-", "_")
  return language


def documents(root, locale, english_paragraphs=frozenset(), chapter_filter=None):
  """Yield {'text', 'lang', 'chapter'} per page; for a non-English locale, paragraphs
  found verbatim in `english_paragraphs` (untranslated) are left out."""
  lang = lang_code(locale, locales(root))
  for chapter, pages in chapters(root, locale):
    if chapter_filter is not None and chapter not in chapter_filter:
      continue
    for page in pages:
      path = os.path.join(root, locale, page)
      if not os.path.isfile(path):
        continue
      kept = [p for p in paragraphs(path) if locale == ENGLISH or p not in english_paragraphs]
      if kept:
        yield {"text": "\n".join(kept), "lang": lang, "chapter": chapter.removesuffix(".html")}


def english_paragraphs(root, chapter_filter=None):
  """The en-US paragraphs (of the chapters in chapter_filter, else the whole book)."""
  return _english_paragraphs(root, None if chapter_filter is None else frozenset(chapter_filter))


@functools.lru_cache(maxsize=8)
def _english_paragraphs(root, chapter_filter):
  return frozenset(p for doc in documents(root, ENGLISH, chapter_filter=chapter_filter)
                   for p in doc["text"].split("\n"))


SPLITS = ("train", "validation", "test")


def chapter_split(index):
  """Chapter i of the book (table-of-contents order) -> its split: every tenth chapter
  from the fourth is validation, from the eighth test, the rest train."""
  return {3: "validation", 7: "test"}.get(index % 10, "train")


def split_chapters(root):
  """{split: set of chapter pages}, identical for every locale."""
  splits = {s: set() for s in SPLITS}
  for i, (chapter, _) in enumerate(chapters(root, ENGLISH)):
    splits[chapter_split(i)].add(chapter)
  return splits


def text_files(text_dir):
  """{split: [files]} of a folder of UTF-8 text (one document per line): <dir>/<split>/*.txt,
  or <dir>/*.txt for train only; every file is checked to decode as UTF-8."""
  splits = {s: sorted(glob.glob(os.path.join(text_dir, s, "*.txt")))
            for s in ("train", "validation", "test")}
  if not any(splits.values()):
    splits = {"train": sorted(glob.glob(os.path.join(text_dir, "*.txt")))}
  splits = {s: files for s, files in splits.items() if files}
  if not splits:
    raise CorpusError(f"the folder {text_dir} holds no .txt files; put UTF-8 text, one document "
                      f"per line, in {text_dir}/*.txt or {text_dir}/<split>/*.txt.")
  for path in (f for files in splits.values() for f in files):
    stat = os.stat(path)
    _check_utf8(path, stat.st_size, stat.st_mtime_ns)
  return splits


@functools.lru_cache(maxsize=4096)
def _check_utf8(path, size, mtime_ns):
  """Raise CorpusError unless the file decodes as UTF-8; read in 16 MiB chunks, once per
  process for a file of the same size and modification time (`size`, `mtime_ns`: the
  cache key)."""
  decoder, start = codecs.getincrementaldecoder("utf-8")(), 0  # start: file offset of the
  with open(path, "rb") as f:                                    # bytes the decoder holds
    chunk = True
    while chunk:
      chunk = f.read(_UTF8_CHUNK)
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not valid UTF-8 (byte {start + e.start}); re-encode it "
                          f"as UTF-8.") from None
      start = f.tell() - len(decoder.getstate()[0])


def folder_texts(folder, max_chars, split="train"):
  """The first max_chars characters of a text folder's documents in `split` (one per
  line)."""
  texts, chars = [], 0
  for path in text_files(folder).get(split, ()):
    with open(path, encoding="utf-8") as f:
      for line in f:
        texts.append(line.rstrip("\n"))
        chars += len(texts[-1])
        if chars >= max_chars:
          return texts
  return texts
