"""seqio Tasks over a per-language TFDS corpus (the embedded `handbook`, or e.g.
wiki40b), one per language, and the temperature-sampled multilingual mixture.

Registration is a call, not an import side effect. `prepare` does everything a
run needs on first use: prepares the TFDS data in a data dir, trains (or finds)
the SentencePiece vocabulary (or reads the one DataConfig.vocab_path names: a .model or
an imported model's tokenizer.json), registers the Tasks and the mixture. Languages
beyond the corpus come from folders of text (DataConfig.text_dirs) or from a call:

  from bigsci_jax.tasks import handbook
  prepared = handbook.prepare(DataConfig(mixture="handbook_multilingual"))
  handbook.register_language("sw", prepared.vocab_path, text_dir="/data/swahili")  # a new language
"""

import dataclasses
import os

import seqio
import tensorflow as tf

import tensorflow_datasets as tfds

from bigsci_jax import corpus as handbook_corpus
from bigsci_jax import handbook_dataset  # noqa: F401  (registers the TFDS builder)
from bigsci_jax import vocab
from bigsci_jax.config import ConfigError
from bigsci_jax.corpus import CorpusError
from bigsci_jax.data import temperature_rates
from bigsci_jax.tasks import vocabularies

HANDBOOK_PATTERN = "handbook/{lang}:1.0.0"
MIN_TRAINED_VOCAB = 260  # 256 byte pieces plus the specials
# A handbook language counts as translated when its train split holds this many TFDS
# record bytes (~0.8 of 500 kB of text: the train split is 8 chapters in 10).
MIN_TRAIN_BYTES = 400_000


def task_name(lang, prefix_lm=False, corpus="handbook"):
  return f"{corpus}_{lang.replace('-', '_')}" + ("_prefix" if prefix_lm else "")


def mixture_name(prefix_lm=False, corpus="handbook"):
  return f"{corpus}_multilingual" + ("_prefix" if prefix_lm else "")


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


def _add(name, source, vocabulary, prefix_lm, clean=None):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  preprocessors = [_rekey_text] + ([clean] if clean else []) + [seqio.preprocessors.tokenize,
                                                                 split_to_length]
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


_WIKI40B_MARKERS = r"_START_(ARTICLE|SECTION|PARAGRAPH)_\n"


def clean_wiki40b(dataset):
  """wiki40b marks structure inline (`_START_ARTICLE_\n`, `_NEWLINE_`); keep only the text."""
  def clean(x):
    text = tf.strings.regex_replace(x["targets"], _WIKI40B_MARKERS, "")
    text = tf.strings.regex_replace(text, "_NEWLINE_", "\n")
    return {**x, "targets": tf.strings.strip(text)}
  return dataset.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _cleaner(pattern):
  return clean_wiki40b if pattern.startswith("wiki40b") else None


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
    source = seqio.TextLineDataSource(handbook_corpus.text_files(text_dir))
  else:
    source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir)
  name = task_name(lang, prefix_lm)
  _add(name, source, vocabularies.load(vocab_path)[0], prefix_lm)
  return name


def mixture_rates(sizes, alpha=0.3, rates=None, text_sizes=None, replay=None):
  """{lang: rate} summing to 1 over the corpus languages `sizes` ({lang: size}) and those
  of text folders `text_sizes`: `rates` normalised when given (one per language), else
  size^alpha over all of them, or with `replay` the corpus languages share `replay`
  (size^alpha among themselves) and the text languages the rest."""
  text_sizes = text_sizes or {}
  every = {**sizes, **text_sizes}
  if rates is not None:
    if set(rates) != set(every):
      raise CorpusError(f"DataConfig.rates names {', '.join(sorted(rates))} but the mixture has "
                        f"{', '.join(sorted(every))}; give one rate per language of the mixture.")
    return {lang: rates[lang] / sum(rates.values()) for lang in every}
  if replay is None or not text_sizes:
    return temperature_rates(every, alpha)
  old, new = temperature_rates(sizes, alpha), temperature_rates(text_sizes, alpha)
  return {**{l: replay * r for l, r in old.items()}, **{l: (1 - replay) * r for l, r in new.items()}}


def register(data_dir, vocab_path, sizes, alpha=0.3, prefix_lm=False,
             pattern=HANDBOOK_PATTERN, corpus="handbook", rates=None, text_dirs=None,
             replay=None, vocabulary=None):
  """Register one Task per language of `sizes` ({lang: size}) over the TFDS dataset
  `pattern.format(lang=lang)` in data_dir, one per language of `text_dirs` ({lang: folder
  of text}), and the mixture of those with a non-zero rate (mixture_rates). Returns the
  mixture name. `vocabulary`: vocab_path's seqio vocabulary when the caller has read it."""
  vocabulary = vocabulary or vocabularies.load(vocab_path)[0]
  text_files = {lang: handbook_corpus.text_files(folder)
                for lang, folder in (text_dirs or {}).items()}
  for lang, files in text_files.items():
    if "train" not in files:
      raise CorpusError(f"the text folder of {lang!r} has no training text: put it in "
                        f"{text_dirs[lang]}/train/*.txt (or {text_dirs[lang]}/*.txt).")
  rates = mixture_rates(sizes, alpha, rates, _text_sizes(text_files), replay)
  for lang in sizes:
    source = seqio.TfdsDataSource(pattern.format(lang=lang), tfds_data_dir=data_dir)
    _add(task_name(lang, prefix_lm, corpus), source, vocabulary, prefix_lm, _cleaner(pattern))
  for lang, files in text_files.items():
    _add(task_name(lang, prefix_lm, corpus), seqio.TextLineDataSource(files), vocabulary,
         prefix_lm)
  name = mixture_name(prefix_lm, corpus)
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(task_name(l, prefix_lm, corpus), r)
                                   for l, r in rates.items() if r > 0])
  return name


def _text_sizes(text_files):
  """{lang: bytes of its train files}."""
  return {lang: float(sum(os.path.getsize(f) for f in files.get("train", ())))
          for lang, files in text_files.items()}


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` made ready: train on `mixture`, evaluate each of `tasks`."""
  mixture: str
  tasks: dict        # {lang: task name}
  vocab_path: str
  tokenizer: object  # bigsci_jax.tokenizer.Tokenizer of vocab_path
  sizes: dict        # {lang: train-split bytes}, what the mixture rates follow


def default_data_dir():
  return os.environ.get("BIGSCI_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "bigsci_jax")


def _builder(name, data_dir, prepare):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise CorpusError(f"the TFDS dataset {name} does not exist ({str(e).splitlines()[0][:120]}): "
                      f"check DataConfig.tfds_pattern and DataConfig.languages.") from None
  if prepare:
    builder.download_and_prepare()
  return builder


def handbook_languages(data_dir, dataset="handbook"):
  """The handbook languages really translated: train split >= MIN_TRAIN_BYTES once the
  paragraphs identical to en-US are gone (each config is prepared once, ~0.6 s)."""
  configs = tfds.builder_cls(dataset).BUILDER_CONFIGS
  return tuple(c.name for c in configs
               if _builder(f"{dataset}/{c.name}", data_dir, True).info.splits["train"].num_bytes
               >= MIN_TRAIN_BYTES)


def _check_handbook_languages(languages, dataset):
  known = [c.name for c in tfds.builder_cls(dataset).BUILDER_CONFIGS]
  for lang in languages:
    if lang not in known:
      raise CorpusError(
          f"unknown language {lang!r}: the handbook has {', '.join(known)}; add another language "
          f"with bigsci_jax.tasks.handbook.register_language (a folder of text or a TFDS dataset).")


def _train_texts(builder, max_chars):
  texts, chars = [], 0
  for x in builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator():
    texts.append(x["text"].decode("utf-8"))
    chars += len(texts[-1])
    if chars >= max_chars:
      break
  return texts


def prepare(data_cfg, *, prefix_lm=False, primary=True, dataset="handbook"):
  """Prepare the TFDS data and the vocabulary for `data_cfg` (a config.DataConfig) and
  register its Tasks and mixture; everything is cached in the data dir, so later
  calls only read. `primary=False` (processes other than 0) never trains the
  vocabulary: it must already be visible. `dataset` swaps the handbook's TFDS
  builder (tests prepare a few chapters)."""
  corpus, which = data_cfg.corpus, data_cfg.mixture.partition("_")[2]
  if data_cfg.vocab_path:  # before any data is prepared
    vocabularies.check_exists(data_cfg.vocab_path)
  elif data_cfg.vocab_size < MIN_TRAINED_VOCAB:
    raise ConfigError(f"DataConfig.vocab_size={data_cfg.vocab_size} is invalid: a SentencePiece "
                      f"vocabulary with byte fallback needs at least {MIN_TRAINED_VOCAB} pieces "
                      f"(256 bytes plus specials).")
  data_dir = data_cfg.data_dir or default_data_dir()
  if corpus == "handbook":
    handbook_corpus.handbook_root()  # one sentence on how to install it when it is absent
    pattern = f"{dataset}/{{lang}}:1.0.0"
    languages = (data_cfg.languages or (handbook_languages(data_dir, dataset)
                                        if which == "multilingual" else (which,)))
    _check_handbook_languages(languages, dataset)
  else:
    pattern = data_cfg.tfds_pattern
    languages = data_cfg.languages if which == "multilingual" else (which,)
  builders = {lang: _builder(pattern.format(lang=lang), data_dir, corpus == "handbook")
              for lang in languages}
  sizes = {lang: float(b.info.splits["train"].num_bytes) for lang, b in builders.items()}
  vocab_path, text_dirs = data_cfg.vocab_path, dict(data_cfg.text_dirs or {})
  if not vocab_path:
    cfg = vocab.VocabConfig(vocab_size=data_cfg.vocab_size, alpha=data_cfg.alpha,
                            seed=data_cfg.seed)
    if "://" in data_dir:
      raise CorpusError(f"a vocabulary cannot be trained into {data_dir}: set "
                        f"DataConfig.vocab_path to a SentencePiece model for this corpus.")
    texts = {lang: _train_texts(b, cfg.sample_chars) for lang, b in builders.items()}
    texts.update({lang: handbook_corpus.folder_texts(folder, cfg.sample_chars)
                  for lang, folder in text_dirs.items()})
    text_sizes = _text_sizes({lang: handbook_corpus.text_files(folder)
                              for lang, folder in text_dirs.items()})
    vocab_path = vocab.train(texts, os.path.join(data_dir, "vocab"), cfg,
                             sizes={**sizes, **text_sizes}, cached_only=not primary)
  vocabulary, tok = vocabularies.load(vocab_path)
  if which == "multilingual":
    mixture = register(data_dir, vocab_path, sizes, data_cfg.alpha, prefix_lm, pattern, corpus,
                       data_cfg.rates, text_dirs, data_cfg.replay, vocabulary)
  else:
    source = seqio.TfdsDataSource(pattern.format(lang=which), tfds_data_dir=data_dir)
    mixture = task_name(which, prefix_lm, corpus)
    _add(mixture, source, vocabulary, prefix_lm, _cleaner(pattern))
  return Prepared(mixture=mixture, vocab_path=vocab_path, tokenizer=tok, sizes=sizes,
                  tasks={lang: task_name(lang, prefix_lm, corpus)
                         for lang in (*languages, *text_dirs)})
