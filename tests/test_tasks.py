"""seqio Tasks and the temperature-sampled mixture over real handbook slices."""

import collections
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
tf.config.set_visible_devices([], "GPU")
seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

from bigsci_jax import corpus, data, vocab  # noqa: E402
from bigsci_jax import handbook_dataset as hd  # noqa: E402
from bigsci_jax.tasks import handbook  # noqa: E402

LOCALES = (("en-US", "en"), ("fr-FR", "fr"), ("ja-JP", "ja"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = corpus.handbook_root()
  book = [c for c, _ in corpus.chapters(root, corpus.ENGLISH)]
  chapters = (book[0], book[3], book[7], book[10])
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  english = corpus.english_paragraphs(root, set(chapters))
  dataset = hd.slice_builder("handbook_tasks_slice", chapters).name
  texts = {}
  for locale, lang in LOCALES:
    tfds.builder(f"{dataset}/{lang}", data_dir=data_dir).download_and_prepare()
    texts[lang] = [d["text"] for d in corpus.documents(root, locale, english, set(chapters))]
  vocab_path = vocab.train(texts, str(tmp_path_factory.mktemp("vocab")),
                           vocab.VocabConfig(vocab_size=2000, sample_chars=200_000))
  return data_dir, vocab_path, f"{dataset}/{{lang}}:1.0.0", texts


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_mixture_shares_follow_the_temperature_rates(prepared, alpha):
  data_dir, vocab_path, pattern, texts = prepared
  sizes = {lang: sum(map(len, docs)) for lang, docs in texts.items()}
  name = handbook.register(data_dir, vocab_path, sizes, alpha=alpha, pattern=pattern)
  train_docs = {}
  for lang in sizes:
    builder = tfds.builder(pattern.format(lang=lang), data_dir=data_dir)
    for x in builder.as_dataset(split="train").as_numpy_iterator():
      train_docs[x["text"]] = lang
  mixture = seqio.get_mixture_or_task(name)
  dataset = mixture.get_dataset({"targets": 64}, split="train", shuffle=True, num_epochs=None,
                                seed=1, copy_pretokenized=True)
  counts = collections.Counter()
  for x in dataset.take(10_000).as_numpy_iterator():
    counts[train_docs[x["targets_pretokenized"]]] += 1
  expected = data.temperature_rates(sizes, alpha)
  for lang in sizes:
    assert abs(counts[lang] / 10_000 - expected[lang]) < 0.02, (lang, counts, expected)


def test_temperature_rates():
  rates = data.temperature_rates({"en": 100.0, "fr": 25.0}, 0.5)
  assert rates["en"] == pytest.approx(2 / 3) and rates["fr"] == pytest.approx(1 / 3)
  assert data.temperature_rates({"en": 100.0, "fr": 25.0}, 0.0)["fr"] == pytest.approx(0.5)
  with pytest.raises(ValueError):
    data.temperature_rates({"en": 0.0}, 0.3)


def test_prefix_lm_split_reassembles_the_document(prepared):
  data_dir, vocab_path, pattern, texts = prepared
  sizes = {lang: 1.0 for lang in texts}
  handbook.register(data_dir, vocab_path, sizes, prefix_lm=True, pattern=pattern)
  task = seqio.get_mixture_or_task(handbook.task_name("fr", prefix_lm=True))
  vocabulary = seqio.SentencePieceVocabulary(vocab_path)
  cuts = []
  for x in task.get_dataset(None, split="validation", shuffle=False, seed=3).as_numpy_iterator():
    inputs, targets = list(x["inputs"]), list(x["targets"])
    assert targets[-1] == 1 and 1 not in inputs            # EOS closes the targets only
    assert vocabulary.decode(inputs + targets[:-1]) == x["targets_pretokenized"].decode()
    cuts.append(len(inputs) / (len(inputs) + len(targets) - 1))
  assert len(cuts) >= 2 and np.std(cuts) > 0.05           # the split point varies


def test_two_process_shards_are_disjoint_and_cover_the_data(prepared):
  data_dir, vocab_path, pattern, texts = prepared
  handbook.register(data_dir, vocab_path, {lang: 1.0 for lang in texts}, pattern=pattern)
  task = seqio.get_mixture_or_task(handbook.task_name("ja"))

  def documents(shard_info=None):
    ds = task.get_dataset(None, split="test", shuffle=False, num_epochs=1, shard_info=shard_info)
    return [x["targets_pretokenized"] for x in ds.as_numpy_iterator()]

  everything = documents()
  shards = [documents(seqio.ShardInfo(index=i, num_shards=2)) for i in range(2)]
  assert all(shards) and not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_a_new_language_from_a_text_folder(prepared, tmp_path):
  _, vocab_path, _, _ = prepared
  folder = tmp_path / "swahili"
  (folder / "train").mkdir(parents=True)
  lines = ["Habari ya asubuhi, rafiki yangu.", "Kompyuta hii inatumia Debian."]
  (folder / "train" / "part0.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  name = handbook.register_language("sw", vocab_path, text_dir=str(folder))
  task = seqio.get_mixture_or_task(name)
  vocabulary = seqio.SentencePieceVocabulary(vocab_path)
  got = [vocabulary.decode(list(x["targets"][:-1]))
         for x in task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()]
  assert got == lines


def test_text_folder_errors_name_the_problem(prepared, tmp_path):
  _, vocab_path, _, _ = prepared
  with pytest.raises(corpus.CorpusError, match="holds no .txt files"):
    handbook.register_language("xx", vocab_path, text_dir=str(tmp_path))
  (tmp_path / "bad.txt").write_bytes(b"ok line\n\xff\xfe broken\n")
  with pytest.raises(corpus.CorpusError, match=r"bad.txt is not valid UTF-8 \(byte 8\)"):
    handbook.register_language("xx", vocab_path, text_dir=str(tmp_path))


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_packed_rows_resume_exactly_and_mark_prefixes(prepared, prefix_lm):
  from bigsci_jax.pipeline import SeqioSource
  data_dir, vocab_path, pattern, texts = prepared
  name = handbook.register(data_dir, vocab_path, {l: 1.0 for l in texts}, prefix_lm=prefix_lm,
                           pattern=pattern)
  straight = SeqioSource(name, 64, prefix_lm=prefix_lm, seed=5)
  batches = [straight.take(4) for _ in range(5)]
  resumed = SeqioSource(name, 64, prefix_lm=prefix_lm, seed=5)
  resumed.set_state({"rows": 12})  # as restored from a checkpoint after three batches
  for expected in batches[3:]:
    got = resumed.take(4)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  b = batches[0]
  segments = b["decoder_segment_ids"]
  assert segments.shape == (4, 64)
  # Long pages are cut into length-sized chunks, short tails packed together: rows are full.
  all_segments = np.concatenate([x["decoder_segment_ids"] for x in batches])
  assert (all_segments > 0).mean() > 0.9
  assert all_segments.max() >= (2 if prefix_lm else 1)  # prefix LM: chunks of half a row
  if prefix_lm:
    # The prefix is exactly the inputs of each segment: no loss there, loss after it.
    prefix = b["decoder_causal_attention"].astype(bool)
    assert prefix.any() and not (b["decoder_loss_weights"][prefix[:, :]] > 0).all()
    for row in range(4):
      for seg in np.unique(segments[row][segments[row] > 0]):
        where = np.where(segments[row] == seg)[0]
        p = prefix[row, where]
        n_prefix = int(p.sum())
        assert p[:n_prefix].all() and not p[n_prefix:].any()        # a contiguous head
        assert (b["decoder_loss_weights"][row, where[:n_prefix - 1]] == 0).all()
        assert (b["decoder_loss_weights"][row, where[n_prefix:]] == 1).all()
    # DataConfig.loss_on_prefix: the same rows, with loss on every real token.
    on_prefix = SeqioSource(name, 64, prefix_lm=True, loss_on_prefix=True, seed=5).take(4)
    np.testing.assert_array_equal(on_prefix["decoder_target_tokens"], b["decoder_target_tokens"])
    np.testing.assert_array_equal(on_prefix["decoder_loss_weights"], segments > 0)
  else:
    assert not b["decoder_causal_attention"].any()


def test_wiki40b_structure_markers_are_stripped():
  raw = "\n_START_ARTICLE_\nDebian\n_START_SECTION_\nHistory\n_START_PARAGRAPH_\nOne._NEWLINE_Two."
  dataset = tf.data.Dataset.from_tensor_slices({"targets": [raw]})
  assert [x["targets"].decode() for x in handbook.clean_wiki40b(dataset).as_numpy_iterator()] == [
      "Debian\nHistory\nOne.\nTwo."]


def _tokenizer_json(vocab_path, folder):
  """The SentencePiece model at vocab_path exported as folder/tokenizer.json (+ configs)."""
  from bigsci_jax.hf import tokenizer as hf_tokenizer
  with open(vocab_path, "rb") as f:
    hf_tokenizer.write(f.read(), str(folder), max_len=512)
  return str(folder / "tokenizer.json")


def test_a_tokenizer_json_gives_the_tasks_the_ids_sentencepiece_gives(prepared, tmp_path):
  """A task over an imported model's tokenizer.json (encoded by `tokenizers` inside the
  tf.data pipeline) yields the ids of the same vocabulary read as SentencePiece, EOS
  included; packed rows start each document from the tokenizer's bos_id."""
  pytest.importorskip("tokenizers")
  from bigsci_jax.pipeline import SeqioSource
  from bigsci_jax.tasks import vocabularies
  _, vocab_path, _, texts = prepared
  json_path = _tokenizer_json(vocab_path, tmp_path / "hf")
  vocabulary, tok = vocabularies.load(json_path)
  assert isinstance(vocabulary, vocabularies.TokenizerJsonVocabulary)
  assert (vocabulary.eos_id, vocabulary.vocab_size, tok.bos_id) == (1, 2000, 0)
  folder = tmp_path / "text"
  (folder / "train").mkdir(parents=True)
  lines = [t[:300].replace("\n", " ") for t in texts["ja"][:3] + texts["fr"][:3]]
  (folder / "train" / "part0.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  rows = {}
  for name, path in (("spm", vocab_path), ("json", json_path)):
    task = seqio.get_mixture_or_task(handbook.register_language(f"x{name}", path,
                                                                text_dir=str(folder)))
    rows[name] = [list(x["targets"]) for x in
                  task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()]
  assert rows["json"] == rows["spm"] and len(rows["spm"]) == len(lines)
  assert all(r[-1] == 1 for r in rows["json"])
  assert vocabulary.decode(rows["json"][0][:-1]) == lines[0]
  packed = SeqioSource(handbook.task_name("xjson"), 64, seed=0, bos_id=7).take(4)
  starts = (packed["decoder_positions"] == 0) & (packed["decoder_segment_ids"] > 0)
  assert starts.sum() >= 4 and (packed["decoder_input_tokens"][starts] == 7).all()
  with pytest.raises(corpus.CorpusError, match=r"vocab_path=.*missing.json does not exist"):
    vocabularies.load(str(tmp_path / "missing.json"))


def test_text_folders_join_the_mixture_with_a_replay_share(prepared, tmp_path):
  data_dir, vocab_path, pattern, texts = prepared
  sizes = {lang: sum(map(len, docs)) for lang, docs in texts.items()}
  rates = handbook.mixture_rates(sizes, 0.3, text_sizes={"sw": 10.0, "yo": 40.0}, replay=0.25)
  assert sum(rates[l] for l in sizes) == pytest.approx(0.25)
  assert rates["yo"] / rates["sw"] == pytest.approx(4 ** 0.3)
  assert sum(rates.values()) == pytest.approx(1.0)
  folder = tmp_path / "sw"
  (folder / "train").mkdir(parents=True)
  (folder / "train" / "a.txt").write_text("Habari ya asubuhi.\nKompyuta hii.\n", encoding="utf-8")
  name = handbook.register(data_dir, vocab_path, sizes, pattern=pattern,
                           text_dirs={"sw": str(folder)}, replay=0.25)
  swahili = {"Habari ya asubuhi.", "Kompyuta hii."}
  dataset = seqio.get_mixture_or_task(name).get_dataset(
      {"targets": 64}, split="train", shuffle=True, num_epochs=None, seed=1,
      copy_pretokenized=True)
  share = np.mean([x["targets_pretokenized"].decode() in swahili
                   for x in dataset.take(2000).as_numpy_iterator()])
  assert abs(share - 0.75) < 0.04, share
  (tmp_path / "only_val" / "validation").mkdir(parents=True)
  (tmp_path / "only_val" / "validation" / "a.txt").write_text("x\n", encoding="utf-8")
  with pytest.raises(corpus.CorpusError, match="'xx' has no training text"):
    handbook.register(data_dir, vocab_path, sizes, pattern=pattern,
                      text_dirs={"xx": str(tmp_path / "only_val")})
