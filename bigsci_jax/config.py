"""Frozen run configuration: one small dataclass per part, validated on creation.

Library code takes these objects whole; only train.py and gin/ know gin exists.
Every check raises `ConfigError` with one sentence naming the field, the bad
value and what is allowed, before anything is compiled.
"""

import dataclasses
import math
import re
import typing
from typing import Literal, Optional

OFFLOAD = ("none", "host")  # where an inference model's parameters live (model.Transformer)


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field."""


def _check(cond, obj, name, requirement):
  if not cond:
    raise ConfigError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r} is invalid: "
                      f"{requirement}.")


def _check_literals(obj):
  """Every Literal (or Optional[Literal]) field holds one of its choices."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    hint = hints[f.name]
    optional = typing.get_origin(hint) is typing.Union
    inner = typing.get_args(hint)[0] if optional else hint
    if typing.get_origin(inner) is not Literal:
      continue
    choices = typing.get_args(inner) + ((None,) if optional else ())
    value = getattr(obj, f.name)
    if value not in choices:
      allowed = ", ".join(repr(c) for c in choices)
      raise ConfigError(f"{type(obj).__name__}.{f.name}={value!r} is not allowed; "
                        f"choose one of {allowed}.")


def default_alibi_slopes(num_heads):
  """Press et al. 2022's geometric slopes: 2^(-8/n), 2^(-16/n), ... for n heads.

  For n not a power of two: the slopes of the next lower power of two p, then
  every other slope of 2p (the paper's recipe).
  """
  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  p = 2 ** math.floor(math.log2(num_heads))
  slopes = power_of_two(p)
  if p < num_heads:
    slopes += power_of_two(2 * p)[0::2][: num_heads - p]
  return tuple(slopes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only / prefix-LM transformer (pre-norm)."""
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: Optional[int] = None  # None: num_heads (multi-head attention)
  head_dim: Optional[int] = None      # None: d_model // num_heads
  d_ff: Optional[int] = None          # None: 4 * d_model
  vocab_size: int = 256
  max_len: int = 2048
  mask: Literal["causal", "prefix"] = "causal"
  position: Literal["learned", "sinusoidal", "rotary", "alibi", "none"] = "learned"
  rope_theta: float = 10000.0
  sinusoid_tiles: int = 1  # sinusoidal table built at d_model / tiles and repeated (width growth)
  alibi_slopes: Optional[tuple] = None  # None: default_alibi_slopes(num_heads)
  activation: Literal["gelu", "geglu", "swiglu", "relu2"] = "gelu"
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  embedding_norm: bool = False        # BLOOM: a norm right after the embedding
  tie_embeddings: bool = True
  use_bias: bool = True
  z_loss: float = 0.0
  dropout: float = 0.0
  init_std: float = 0.02
  # auto: bf16 on GPU/TPU, f32 on CPU; float64 only for exactness tests (jax_enable_x64)
  dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
  param_dtype: Literal["float32", "bfloat16", "float64"] = "float32"
  scan_layers: bool = True
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
  attention_impl: Literal["auto", "reference", "xla", "cudnn", "pallas_gpu", "pallas_tpu"] = "auto"
  # Sequence parallelism (Korthikanti et al. 2022): the residual stream between the
  # tensor-parallel matmuls (norms, dropout, residual adds, what remat saves) split along
  # its length over the mesh's tensor axis instead of copied on every tensor device;
  # the same function, other collectives (sharding.RULES, model.Block).
  sequence_parallel: bool = False
  # Columns of the length whose logits exist at a time in the loss, in scoring and in
  # prompt log-probabilities (0: all): the [B, L, V] logits of a large vocabulary cut
  # to [B, logits_chunk, V], each chunk's recomputed in the backward pass (model.over_logits).
  logits_chunk: int = 0

  def __post_init__(self):
    _check_literals(self)
    for name in ("num_layers", "d_model", "num_heads", "vocab_size", "max_len"):
      _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
             self, name, "it must be a positive integer")
    if self.head_dim is None:
      _check(self.d_model % self.num_heads == 0, self, "num_heads",
             f"it must divide d_model={self.d_model} (or set head_dim)")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    _check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, self,
           "num_kv_heads", f"it must divide num_heads={self.num_heads}")
    if self.d_ff is None:
      object.__setattr__(self, "d_ff", 4 * self.d_model)
    _check(self.d_ff > 0, self, "d_ff", "it must be positive")
    _check(self.sinusoid_tiles > 0 and self.d_model % self.sinusoid_tiles == 0, self,
           "sinusoid_tiles", f"it must divide d_model={self.d_model}")
    if self.position == "rotary":
      _check(self.head_dim % 2 == 0, self, "head_dim", "rotary positions need an even head_dim")
    if self.alibi_slopes is None:
      if self.position == "alibi":
        object.__setattr__(self, "alibi_slopes", default_alibi_slopes(self.num_heads))
    else:
      object.__setattr__(self, "alibi_slopes", tuple(float(s) for s in self.alibi_slopes))
      _check(len(self.alibi_slopes) == self.num_heads, self, "alibi_slopes",
             f"it needs one slope per head ({self.num_heads})")
    _check(0.0 <= self.dropout < 1.0, self, "dropout", "it must be in [0, 1)")
    _check(self.z_loss >= 0.0, self, "z_loss", "it must be >= 0")
    _check(isinstance(self.logits_chunk, int) and self.logits_chunk >= 0, self, "logits_chunk",
           "it must be a number of columns >= 0 (0: the logits of all columns at once)")


# ModelConfig fields that say how the model is computed, not what it computes: its
# parameters and its function (up to rounding) are the same whatever they are, so a run
# may set them anew against the checkpoint it continues (TrainConfig.branch_from).
COMPUTE_FIELDS = ("dtype", "remat", "attention_impl", "sequence_parallel", "logits_chunk")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW (or plain SGD, for exactness tests) and the learning-rate schedule."""
  optimizer: Literal["adamw", "sgd"] = "adamw"
  learning_rate: float = 3e-4
  warmup_steps: int = 0
  decay: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = "cosine"
  decay_steps: Optional[int] = None   # None: the run's train_steps
  final_lr_fraction: float = 0.1
  # decay='wsd' (warmup-stable-decay; Hu et al. 2024, Hagele et al. 2024): the peak
  # until the last cooldown_fraction of decay_steps, then down to the final fraction
  # along 1 - x (linear) or 1 - sqrt(x) (Hagele et al.'s best cooldown shape).
  cooldown_fraction: float = 0.2
  cooldown_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
  b1: float = 0.9
  b2: float = 0.95   # Porian et al. 2024: raise toward 0.99+ at small batch
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: tuple = ("bias", "scale", "embedding")  # parameter names never decayed
  clip_norm: Optional[float] = 1.0
  # After a growth stage (Shen et al. 2022): from step rewarm_start the LR re-warms
  # linearly over rewarm_steps to the schedule's value there; 0: no re-warm.
  rewarm_start: int = 0
  rewarm_steps: int = 0

  def __post_init__(self):
    _check_literals(self)
    _check(self.learning_rate > 0, self, "learning_rate", "it must be positive")
    _check(self.rewarm_start >= 0, self, "rewarm_start", "it must be >= 0")
    _check(self.rewarm_steps >= 0, self, "rewarm_steps", "it must be >= 0")
    _check(self.warmup_steps >= 0, self, "warmup_steps", "it must be >= 0")
    _check(0.0 <= self.final_lr_fraction <= 1.0, self, "final_lr_fraction", "it must be in [0, 1]")
    _check(0.0 < self.cooldown_fraction <= 1.0, self, "cooldown_fraction", "it must be in (0, 1]")
    _check(0.0 <= self.b1 < 1.0, self, "b1", "it must be in [0, 1)")
    _check(0.0 <= self.b2 < 1.0, self, "b2", "it must be in [0, 1)")
    _check(self.clip_norm is None or self.clip_norm > 0, self, "clip_norm",
           "it must be positive or None")
    object.__setattr__(self, "no_decay", tuple(self.no_decay))


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """Global batch, micro-batch (gradient accumulation) and the batch-size schedule.

  schedule='linear' with `warmup_start` (BigScience, after Megatron's rampup): the
  global batch starts at `warmup_start` sequences and grows by `warmup_increment`
  in equal token intervals until `batch_size` is reached after `warmup_tokens`
  tokens; without `warmup_start` it is `batch_size` throughout.

  schedule='gns': the batch follows the measured gradient noise scale
  (TrainConfig.gns_every must be on). Every `gns_adapt_every` steps it becomes
  `gns_factor` x B_simple (converted from tokens to sequences), rounded up to a
  multiple of `warmup_increment`, within [warmup_start, batch_size], and never
  shrinks. Its state (the current size) is part of the train state.

  Every size is a multiple of `micro_batch_size`, the one shape the step is compiled for.
  """
  batch_size: int = 16        # sequences per global batch
  seq_len: int = 128
  micro_batch_size: Optional[int] = None  # None: batch_size (no accumulation)
  warmup_start: Optional[int] = None      # None: no batch-size warmup
  warmup_increment: Optional[int] = None  # None: micro_batch_size
  warmup_tokens: int = 0
  schedule: Literal["linear", "gns"] = "linear"
  gns_adapt_every: int = 10
  gns_factor: float = 1.0

  def __post_init__(self):
    _check_literals(self)
    _check(self.batch_size > 0, self, "batch_size", "it must be positive")
    _check(self.seq_len > 0, self, "seq_len", "it must be positive")
    if self.micro_batch_size is None:
      object.__setattr__(self, "micro_batch_size", self.batch_size)
    _check(self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size == 0, self,
           "micro_batch_size", f"it must divide batch_size={self.batch_size}")
    _check(self.gns_adapt_every > 0, self, "gns_adapt_every", "it must be positive")
    _check(self.gns_factor > 0, self, "gns_factor", "it must be positive")
    _check(self.schedule == "linear" or self.warmup_start is not None, self, "warmup_start",
           "schedule='gns' starts from warmup_start sequences; set it (the smallest batch)")
    if self.warmup_start is None:
      return
    if self.warmup_increment is None:
      object.__setattr__(self, "warmup_increment", self.micro_batch_size)
    for name in ("warmup_start", "warmup_increment"):
      _check(getattr(self, name) > 0 and getattr(self, name) % self.micro_batch_size == 0,
             self, name, f"it must be a positive multiple of micro_batch_size={self.micro_batch_size}")
    _check(self.warmup_start <= self.batch_size, self, "warmup_start",
           f"it must be at most batch_size={self.batch_size}")
    _check((self.batch_size - self.warmup_start) % self.warmup_increment == 0
           or self.schedule == "gns", self,
           "warmup_increment", f"it must divide batch_size - warmup_start="
           f"{self.batch_size - self.warmup_start}")
    _check(self.warmup_tokens > 0 or self.schedule == "gns", self, "warmup_tokens",
           "a batch-size warmup needs a positive token budget")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape over (data, fsdp, tensor); -1 takes the remaining devices.

  slices > 1: the devices are that many slices joined by a slower network (TPU
  multislice over DCN, GPU hosts over InfiniBand): the data axis runs across them and
  each slice holds data / slices of it with all of fsdp and tensor, so only the
  data-parallel gradient reduction crosses between slices (sharding.device_grid)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  slices: int = 1

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    _check(sizes.count(-1) <= 1, self, "data", "at most one mesh axis may be -1")
    for name in ("data", "fsdp", "tensor"):
      _check(getattr(self, name) == -1 or getattr(self, name) > 0, self, name,
             "a mesh axis size must be positive or -1")
    _check(self.slices > 0, self, "slices", "it must be a positive number of slices")
    _check(self.data == -1 or self.data % self.slices == 0, self, "data",
           f"the data axis spans the {self.slices} slices, so it must be a multiple of "
           f"MeshConfig.slices")


def parse_mesh(text):
  """'DATAxFSDPxTENSOR' (e.g. '1x32x8', -1 allowed once) -> {axis: size} of MeshConfig."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
    raise ConfigError(f"--mesh={text!r}: write DATAxFSDPxTENSOR, e.g. 1x32x8.")
  return dict(zip(("data", "fsdp", "tensor"), (int(p) for p in parts)))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training and evaluation batches come from.

  `mixture` is 'synthetic' (no files), '<corpus>_multilingual' (every language of
  `languages`, sampled with rates proportional to train-split bytes ** alpha) or
  '<corpus>_<lang>' (one language). The corpus 'handbook' is the embedded Debian
  Handbook, prepared on first use; any other corpus is a TFDS dataset per language
  named by `tfds_pattern` (e.g. 'wiki40b/{lang}:1.3.0').

  `text_dirs` adds languages to a multilingual mixture from folders of UTF-8 text (one
  document per line, <dir>/<split>/*.txt or <dir>/*.txt for train only); they are
  trained on and evaluated (where they have the split) like the corpus's. With
  `replay`, the corpus languages keep that share of the mixture and the text-folder
  languages split the rest (each group by size ** alpha): continued pretraining on a
  new language with replay of the old ones (gin/recipes/adapt_language.gin).
  """
  mixture: str = "synthetic"
  seed: int = 0
  mean_doc_len: int = 96       # synthetic documents: mean length in tokens
  languages: tuple = ()        # (): every really translated handbook language
  alpha: float = 0.3           # mixture temperature (mT5: 0.3)
  rates: Optional[dict] = None  # {lang: rate}: explicit mixture rates instead of size^alpha
  tfds_pattern: str = ""       # corpora other than 'handbook': TFDS name with {lang}
  data_dir: str = ""           # TFDS data dir; '': $BIGSCI_DATA_DIR or ~/.cache/bigsci_jax
  vocab_size: int = 8192       # SentencePiece vocabulary trained on the mixture
  vocab_path: str = ""         # a SentencePiece .model or tokenizer.json; '': the run's own, or trained
  text_dirs: Optional[dict] = None  # {lang: folder of .txt}: languages beyond the corpus
  replay: Optional[float] = None  # with text_dirs: the corpus languages' share of the mixture
  loss_on_prefix: bool = False  # prefix LM: also train on the bidirectional prefix

  def __post_init__(self):
    object.__setattr__(self, "languages", tuple(self.languages))
    corpus, _, which = self.mixture.partition("_")
    _check(self.mixture == "synthetic" or (corpus and which), self, "mixture",
           "use 'synthetic', '<corpus>_multilingual' or '<corpus>_<lang>', e.g. "
           "'handbook_multilingual' or 'handbook_fr'")
    _check(self.mean_doc_len > 1, self, "mean_doc_len", "it must be > 1")
    _check(self.alpha >= 0, self, "alpha", "it must be >= 0 (0: uniform over languages)")
    _check(self.rates is None or (isinstance(self.rates, dict) and self.rates and all(
        isinstance(r, (int, float)) and r > 0 for r in self.rates.values())), self, "rates",
        "it must be None or a dict of positive rates per language, e.g. {'en': 0.6, 'fr': 0.4} "
        "(`python -m bigsci_jax.scaling mixture` writes one)")
    _check(self.vocab_size > 0, self, "vocab_size", "it must be > 0")
    _check(corpus in ("synthetic", "handbook") or "{lang}" in self.tfds_pattern, self,
           "tfds_pattern", f"the corpus {corpus!r} is not the embedded handbook, so name its TFDS "
           f"datasets with a {{lang}} placeholder, e.g. '{corpus}/{{lang}}:1.3.0'")
    _check(corpus in ("synthetic", "handbook") or which != "multilingual" or self.languages,
           self, "languages", f"list the languages of the {corpus!r} corpus to mix")
    _check(self.text_dirs is None or (isinstance(self.text_dirs, dict) and self.text_dirs and all(
        isinstance(d, str) and d for d in self.text_dirs.values())), self, "text_dirs",
        "it must be None or a dict {language: folder of .txt files}, e.g. {'sw': '/data/sw'}")
    _check(not self.text_dirs or which == "multilingual", self, "text_dirs",
           f"text folders join a multilingual mixture: set DataConfig.mixture to "
           f"'{corpus}_multilingual' (DataConfig.languages picks the corpus languages)")
    _check(self.replay is None or 0 <= self.replay < 1, self, "replay",
           "it must be None or a share in [0, 1) of the mixture kept for the corpus languages")

  @property
  def corpus(self):
    return self.mixture.partition("_")[0]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: length, seeds, how often to log, evaluate and checkpoint, and what a
  bad step does.

  Update guard: a step whose loss or gradient norm is not finite, or is above
  `loss_spike_factor` / `grad_spike_factor` times the median of the last
  `spike_window` accepted steps, leaves parameters and optimizer state unchanged
  (its batch is consumed, the step counts). After `max_skips` skips in a row the run
  aborts, or with `on_max_skips='rollback'` restores the last checkpoint's weights
  and goes on with the next batches (PaLM's recipe); a second rollback to the same
  checkpoint aborts. SIGTERM saves the current step and exits within
  `preemption_grace_s` seconds.
  """
  train_steps: int = 200
  seed: int = 0
  log_every: int = 1
  eval_every: int = 0          # 0: evaluate only at the end
  eval_batches: int = 2        # micro-batches per language; 0: the whole validation split
  eval_at_start: bool = False  # also evaluate the weights a run starts from at step 0
  eval_tasks: tuple = ()       # built-in tasks (evaluate.TASKS, e.g. 'next_sentence/fr') scored
                               # at every evaluation: '<task>/acc' ... in the eval lines
  eval_task_limit: int = 100   # items per task
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  loss_spike_factor: float = 0.0  # 0: no loss-spike test (non-finite values are always skipped)
  grad_spike_factor: float = 0.0  # 0: no gradient-norm spike test
  spike_window: int = 32
  max_skips: int = 5
  on_max_skips: Literal["abort", "rollback"] = "abort"
  preemption_grace_s: float = 120.0
  gns_every: int = 0       # gradient noise scale: 0 off; else sampled every gns_every steps
                           # (from the micro-batches; without accumulation, two half batches)
  gns_ema: float = 0.95    # its moving averages' decay per sample
  watch_every: int = 0     # per-layer weight, gradient and update norms ("watch" lines of
                           # metrics.jsonl, scaling/layer_norms.py) every watch_every steps,
                           # the gradient's at every skipped update; 0 off
  init_from: str = ""      # a model_dir whose latest weights start a fresh run (new optimizer,
                           # data and schedule): continued pretraining on other data, a
                           # causal model adapted to prefix LM (same parameter shapes)
  branch_from: str = ""    # a model_dir whose checkpoint at branch_step this run continues
  branch_step: Optional[int] = None  # (weights, optimizer, data position; None: its latest)
  keep_steps: tuple = ()   # checkpoints also saved at these steps and never deleted
  profile_steps: int = 0   # a device trace of this many steps in model_dir (bigsci_jax.profiler)
  profile_skip: int = 2    # steps after each start or resume before the trace (they compile)

  def __post_init__(self):
    _check_literals(self)
    _check(self.train_steps > 0, self, "train_steps", "it must be positive")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "spike_window", "max_skips",
                 "preemption_grace_s"):
      _check(getattr(self, name) > 0, self, name, "it must be positive")
    for name in ("loss_spike_factor", "grad_spike_factor"):
      _check(getattr(self, name) == 0 or getattr(self, name) > 1, self, name,
             "it must be 0 (off) or above 1")
    _check(self.eval_every >= 0, self, "eval_every", "it must be >= 0")
    _check(self.gns_every >= 0, self, "gns_every", "it must be >= 0 (0: off)")
    _check(0 < self.gns_ema < 1, self, "gns_ema", "it must be in (0, 1)")
    _check(self.watch_every >= 0, self, "watch_every", "it must be >= 0 (0: off)")
    _check(self.eval_batches >= 0, self, "eval_batches", "it must be >= 0")
    object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
    _check(self.eval_task_limit > 0, self, "eval_task_limit", "it must be positive")
    _check(not (self.branch_from and self.init_from), self, "branch_from",
           "a run continues another run's checkpoint (branch_from) or starts from its weights "
           "(init_from), not both")
    _check(self.branch_step is None or self.branch_step > 0, self, "branch_step",
           "it must be a positive checkpoint step or None (the latest)")
    object.__setattr__(self, "keep_steps", tuple(self.keep_steps))
    _check(all(isinstance(s, int) and s > 0 for s in self.keep_steps), self, "keep_steps",
           "it must list positive steps")
    _check(self.profile_steps >= 0, self, "profile_steps", "it must be >= 0 (0: no trace)")
    _check(self.profile_skip >= 0, self, "profile_skip", "it must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  batch: BatchConfig = BatchConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    _check(self.batch.seq_len <= self.model.max_len or self.model.position != "learned",
           self.batch, "seq_len", f"learned positions need seq_len <= max_len={self.model.max_len}")
    _check(self.model.vocab_size >= 8 or self.data.mixture != "synthetic", self.model, "vocab_size",
           "the synthetic source needs at least 8 tokens")
    _check(self.data.mixture == "synthetic" or self.data.vocab_path
           or self.model.vocab_size >= self.data.vocab_size, self.model, "vocab_size",
           f"it must hold DataConfig.vocab_size={self.data.vocab_size} SentencePiece pieces")
    _check(self.train.train_steps * self.batch.batch_size < 2 ** 31, self.train, "train_steps",
           "train_steps x batch_size must stay below 2^31 sequences (the LR clock is int32); "
           "use longer sequences or fewer steps")
    _check(self.batch.schedule != "gns" or self.train.gns_every > 0, self.train, "gns_every",
           "BatchConfig.schedule='gns' follows the measured noise scale; set gns_every > 0")
    _check(self.train.eval_batches > 0 or self.data.mixture != "synthetic", self.train,
           "eval_batches", "synthetic data has no end, so evaluate a fixed number (> 0) of batches")

  def to_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d):
    def build(klass, values):
      values = dict(values)
      for f in dataclasses.fields(klass):
        if isinstance(values.get(f.name), list):
          values[f.name] = tuple(values[f.name])
      return klass(**values)
    hints = typing.get_type_hints(cls)
    return cls(**{name: build(hints[name], d[name]) for name in d})


def to_gin(run: RunConfig):
  """The run as gin bindings, one per config field (no gin import needed): what a
  model_dir's config.gin holds when a run is written without gin files."""
  lines = []
  for part in dataclasses.fields(run):
    config = getattr(run, part.name)
    for f in dataclasses.fields(config):
      value = getattr(config, f.name)
      if isinstance(value, tuple):
        value = list(value)
      lines.append(f"{type(config).__name__}.{f.name} = {value!r}")
  return "\n".join(lines) + "\n"
