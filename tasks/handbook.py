"""seqio Tasks over the TFDS `handbook` dataset, one per language, and the
temperature-sampled multilingual mixture.

Registration is a call, not an import side effect: the vocabulary is trained on
the corpus first (bigsci_jax.vocab) and the TFDS data prepared in a data dir.

  from bigsci_jax.tasks import handbook
  mixture = handbook.register(data_dir, vocab_path, {"en": 1.0e6, "fr": 0.7e6}, alpha=0.3)
"""

import seqio
import tensorflow as tf

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


def _add(name, source, vocabulary, prefix_lm):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  preprocessors = [_rekey_text, seqio.preprocessors.tokenize]
  features = {"targets": seqio.Feature(vocabulary, add_eos=True)}
  if prefix_lm:
    preprocessors.append(random_prefix)
    features["inputs"] = seqio.Feature(vocabulary, add_eos=False)
  preprocessors.append(seqio.preprocessors.append_eos_after_trim)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=features)


def _rekey_text(dataset):
  return dataset.map(lambda x: {"targets": x["text"]}, num_parallel_calls=tf.data.AUTOTUNE)


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
