"""seqio Tasks over the TFDS `handbook` dataset, one per language, and the
temperature-sampled multilingual mixture.

Registration is a call, not an import side effect: the vocabulary is trained on
the corpus first (bigsci_jax.vocab) and the TFDS data prepared in a data dir.

  from bigsci_jax.tasks import handbook
  mixture = handbook.register(data_dir, vocab_path, {"en": 1.0e6, "fr": 0.7e6}, alpha=0.3)
  handbook.register_language("sw", vocab_path, text_dir="/data/swahili")  # a new language
"""

import glob
import os

import seqio
import tensorflow as tf

from bigsci_jax.corpus import CorpusError

from bigsci_jax import handbook_dataset  # noqa: F401  (registers the TFDS builder)
from bigsci_jax.data import temperature_rates

MIXTURE = "handbook_multilingual"


def task_name(lang, prefix_lm=False):
  return f"handbook_{lang}" + ("_prefix" if prefix_lm else "")


@seqio.map_over_dataset(num_seeds=1)
def random_prefix(x, seed):
  """Split each document's tokens at a uniformly random point: the part before becomes
  `inputs` (the bidirectional prefix), the rest `targets` (BigScience: "train with a
  randomly selected prefix")."""
  tokens = x["targets"]
  length = tf.shape(tokens)[0]
  cut = tf.random.stateless_uniform([], seed, minval=1, maxval=tf.maximum(length, 2),
                                    dtype=tf.int32)
  return {**x, "inputs": tokens[:cut], "targets": tokens[cut:]}


def split_to_length(dataset, sequence_length=None):
  """Cut each document's tokens into chunks that fit the targets length (with EOS),
  so long documents are used whole instead of trimmed; `*_pretokenized` text is
  kept on every chunk. Without a sequence length (inspection), documents stay whole."""
  if not sequence_length or not sequence_length.get("targets"):
    return dataset
  size = sequence_length["targets"] - 1

  def chunks(x):
    tokens = x["targets"]
    length = tf.size(tokens)
    full, rest = length // size, length % size
    row_lengths = tf.concat([tf.fill([full], size), tf.reshape(rest, [1])[:tf.minimum(rest, 1)]], 0)
    count = tf.size(row_lengths)
    out = {"targets": tf.RaggedTensor.from_row_lengths(tokens, row_lengths)}
    out.update({k: tf.repeat(v[None], count) for k, v in x.items() if k.endswith("_pretokenized")})
    return tf.data.Dataset.from_tensor_slices(out)

  return dataset.flat_map(chunks)


def _add(name, source, vocabulary, prefix_lm):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  preprocessors = [_rekey_text, seqio.preprocessors.tokenize, split_to_length]
  features = {"targets": seqio.Feature(vocabulary, add_eos=True)}
  if prefix_lm:
    preprocessors.append(random_prefix)
    features["inputs"] = seqio.Feature(vocabulary, add_eos=False)
  preprocessors.append(seqio.preprocessors.append_eos_after_trim)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=features)


def _rekey_text(dataset):
  def rekey(x):
    return {"targets": x["text"] if isinstance(x, dict) else x}  # text files yield plain lines
  return dataset.map(rekey, num_parallel_calls=tf.data.AUTOTUNE)


def _text_files(text_dir):
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
    with open(path, "rb") as f:
      raw = f.read()
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise CorpusError(f"{path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8.") from None
  return splits


def register_language(lang, vocab_path, *, text_dir=None, tfds_name=None, data_dir=None,
                      prefix_lm=False):
  """Add the Task `handbook_<lang>` from a folder of UTF-8 text files (one document per
  line) or from a TFDS dataset with a `text` feature; returns the task name.

    register_language("sw", vocab_path, text_dir="/data/swahili")
    register_language("de", vocab_path, tfds_name="wiki40b/de:1.3.0", data_dir="gs://...")
  """
  if (text_dir is None) == (tfds_name is None):
    raise ValueError("register_language needs exactly one of text_dir and tfds_name.")
  if text_dir is not None:
    source = seqio.TextLineDataSource(_text_files(text_dir))
  else:
    source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir)
  vocabulary = seqio.SentencePieceVocabulary(vocab_path)
  name = task_name(lang, prefix_lm)
  _add(name, source, vocabulary, prefix_lm)
  return name


def register(data_dir, vocab_path, sizes, alpha=0.3, prefix_lm=False, dataset="handbook"):
  """Register one Task per language of `sizes` ({lang: size}) over TFDS
  `<dataset>/<lang>` in data_dir, and the mixture whose rates are proportional to
  size^alpha. Returns the mixture name."""
  vocabulary = seqio.SentencePieceVocabulary(vocab_path)
  rates = temperature_rates(sizes, alpha)
  for lang in sizes:
    source = seqio.TfdsDataSource(f"{dataset}/{lang}:1.0.0", tfds_data_dir=data_dir)
    _add(task_name(lang, prefix_lm), source, vocabulary, prefix_lm)
  name = MIXTURE + ("_prefix" if prefix_lm else "")
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(task_name(l, prefix_lm), rates[l]) for l in sizes])
  return name
