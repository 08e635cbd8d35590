"""TFDS builder `handbook`: the Debian Administrator's Handbook, one config per language.

Features `text`, `lang`, `chapter`; splits train / validation / test by chapter,
the same chapters in every language (a validation chapter never appears in
train). This is the path users take with wiki40b or c4/multilingual on a pod:
`tfds.builder(...).download_and_prepare()` into a data dir, then seqio reads it.

Imports TensorFlow Datasets: only the data pipeline and tasks/ import this module.
"""

import dataclasses
import functools

import tensorflow_datasets as tfds

from bigsci_jax import corpus

@dataclasses.dataclass
class HandbookConfig(tfds.core.BuilderConfig):
  """One locale; `chapters` (pages of chapter openings) limits the book to a slice."""
  locale: str = corpus.ENGLISH
  chapters: tuple = ()
  root: str = ""


def _configs():
  try:
    root = corpus.handbook_root()
  except corpus.CorpusError:
    return []  # the builder still imports; preparing it then names the missing package
  all_locales = corpus.locales(root)
  return [HandbookConfig(name=corpus.lang_code(l, all_locales), locale=l) for l in all_locales]


class Handbook(tfds.core.GeneratorBasedBuilder):
  """The Debian Administrator's Handbook in many languages (CC-BY-SA 3.0 / GPL-2+)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Paragraphs identical to en-US dropped from other locales."}
  BUILDER_CONFIGS = _configs()

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "lang": tfds.features.Text(),
            "chapter": tfds.features.Text()}),
        homepage="https://debian-handbook.info/",
        license="CC-BY-SA-3.0 OR GPL-2.0-or-later")

  def _split_generators(self, dl_manager):
    root = corpus.handbook_root(self.builder_config.root or None)
    splits = corpus.split_chapters(root)
    wanted = set(self.builder_config.chapters)
    english = corpus.english_paragraphs(root, wanted or None)
    return {split: self._generate_examples(root, (pages & wanted) if wanted else pages, english)
            for split, pages in splits.items()}

  def _generate_examples(self, root, chapters, english):
    locale = self.builder_config.locale
    for i, doc in enumerate(corpus.documents(root, locale, english, chapter_filter=chapters)):
      yield f"{doc['chapter']}/{i}", doc


@functools.cache
def slice_builder(name, chapters):
  """A TFDS dataset `name` (snake_case) with the same per-locale configs over only
  `chapters` (chapter pages): a few seconds to prepare, for tests and quick runs."""
  class_name = "".join(part.capitalize() for part in name.split("_"))
  configs = [dataclasses.replace(c, chapters=tuple(chapters)) for c in _configs()]
  builder = type(class_name, (Handbook,), {"BUILDER_CONFIGS": configs, "__module__": __name__})
  assert builder.name == name, (builder.name, name)
  return builder
