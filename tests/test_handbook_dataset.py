"""The TFDS `handbook` builder on a real slice: 3 chapters x 3 languages."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
tf.config.set_visible_devices([], "GPU")  # TensorFlow stays off accelerators
tfds = pytest.importorskip("tensorflow_datasets")

from bigsci_jax import corpus  # noqa: E402
from bigsci_jax import handbook_dataset as hd  # noqa: E402


@pytest.fixture(scope="module")
def slice_chapters():
  root = corpus.handbook_root()
  book = [c for c, _ in corpus.chapters(root, corpus.ENGLISH)]
  return (book[0], book[3], book[7])  # one train, one validation, one test chapter


@pytest.fixture(scope="module")
def built(tmp_path_factory, slice_chapters):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for locale, name in (("en-US", "en_slice"), ("fr-FR", "fr_slice"), ("ja-JP", "ja_slice")):
    builder = hd.Handbook(config=hd.HandbookConfig(name=name, locale=locale, chapters=slice_chapters),
                          data_dir=data_dir)
    builder.download_and_prepare()
    out[locale] = {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
                   for split in corpus.SPLITS}
  return out


def test_every_split_has_its_own_chapters(built, slice_chapters):
  for locale, splits in built.items():
    chapters = {s: {x["chapter"].decode() for x in examples} for s, examples in splits.items()}
    assert all(chapters.values()), (locale, chapters)
    assert not chapters["train"] & chapters["validation"]
    assert not chapters["train"] & chapters["test"] and not chapters["validation"] & chapters["test"]
    expected = {c.removesuffix(".html") for c in slice_chapters}
    assert set().union(*chapters.values()) == expected


def test_examples_carry_language_and_translated_text(built):
  english = {p for x in built["en-US"]["train"] for p in x["text"].decode().split("\n")}
  for locale, lang in (("fr-FR", b"fr"), ("ja-JP", b"ja")):
    train = built[locale]["train"]
    assert train and all(x["lang"] == lang for x in train)
    paragraphs = [p for x in train for p in x["text"].decode().split("\n")]
    assert paragraphs and not set(paragraphs) & english


def test_builder_configs_cover_the_installed_locales():
  names = {c.name for c in hd.Handbook.BUILDER_CONFIGS}
  assert {"en", "fr", "ja", "zh_cn", "zh_tw"} <= names and len(names) == 26


def test_chapter_split_rule():
  assert [corpus.chapter_split(i) for i in range(10)].count("train") == 8
  assert corpus.chapter_split(13) == "validation" and corpus.chapter_split(17) == "test"
