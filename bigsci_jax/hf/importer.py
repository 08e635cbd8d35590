"""A transformers checkpoint (BLOOM or Llama architecture) as a run of this library.

  python -m bigsci_jax.hf import --hf_dir=HF_DIR --model_dir=DIR [--max_len=N]

Reads HF_DIR/config.json and its safetensors weights (one file or an index of shards),
checks every tensor's name and shape before reading any, and writes DIR as a run at
step 0: config.gin / config.json (the other sections at their defaults), an orbax
checkpoint whose parameters are the imported ones (float32, placed straight into their
sharded layout on the current mesh) and whose optimizer state is fresh, and the
tokenizer files HF_DIR has (checked to load first; continued training on text reads
it with them, as any run reads text with the tokenizer it keeps).
`evaluate`, `generate`, `serve` and `python train.py --model_dir=DIR` read it like any
other run.
"""

import json
import os

from bigsci_jax import tokenizer as tokenizers
from bigsci_jax.hf import convert, exporter

# Tensors a checkpoint may hold that are not parameters (recomputed buffers).
_BUFFERS = ("rotary_emb.inv_freq",)


class _Weights:
  """Names, shapes and lazy reads of HF_DIR's safetensors files."""

  def __init__(self, hf_dir, arch):
    from safetensors import safe_open
    index = os.path.join(hf_dir, exporter.INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, exporter.WEIGHTS)):
      files = [exporter.WEIGHTS]
    else:
      raise convert.ConversionError(f"{hf_dir} has no {exporter.WEIGHTS} or {exporter.INDEX}: "
                                    f"give the directory of a safetensors checkpoint.")
    self.handles, self.where, self.shapes = [], {}, {}
    for file in files:
      handle = safe_open(os.path.join(hf_dir, file), framework="numpy")
      self.handles.append(handle)
      for stored in handle.keys():
        name = stored
        # BLOOM checkpoints saved from BloomModel carry no "transformer." prefix.
        if arch == "bloom" and not stored.startswith(("transformer.", "lm_head.")):
          name = "transformer." + stored
        self.where[name] = (handle, stored)
        self.shapes[name] = tuple(handle.get_slice(stored).get_shape())

  def check(self, expected, tied):
    """Raise ConversionError naming every missing, misshapen or unexpected tensor."""
    missing = sorted(set(expected) - set(self.shapes))
    wrong = sorted(f"{n} {self.shapes[n]} (expected {tuple(s)})" for n, s in expected.items()
                   if n in self.shapes and self.shapes[n] != tuple(s))
    extra = sorted(n for n in set(self.shapes) - set(expected)
                   if not n.endswith(_BUFFERS) and not (tied and n == "lm_head.weight"))
    problems = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for label, names in (("missing", missing), ("misshapen", wrong),
                                     ("unexpected", extra)) if names]
    if problems:
      raise convert.ConversionError(f"the checkpoint's tensors do not fit its config.json: "
                                    f"{'; '.join(problems)}.")

  def read(self, name):
    handle, stored = self.where[name]
    return handle.get_tensor(stored)


def import_hf(hf_dir, model_dir, max_len=None, seed=0):
  """Write hf_dir's checkpoint into model_dir as a run; returns a summary dict."""
  from bigsci_jax import loop
  from bigsci_jax.config import DataConfig, RunConfig
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise convert.ConversionError(f"{hf_dir} has no config.json: give the directory of a "
                                  f"transformers checkpoint.")
  if os.path.exists(os.path.join(model_dir, "checkpoints")):
    raise convert.ConversionError(f"{model_dir} already holds a run; import into a new "
                                  f"--model_dir.")
  with open(path) as f:
    config = json.load(f)
  cfg = convert.model_config(config, max_len)
  arch = config["model_type"]
  weights = _Weights(hf_dir, arch)
  weights.check(convert.tensor_shapes(cfg, arch), cfg.tie_embeddings)
  tok = tokenizers.from_dir(hf_dir)  # checked before anything is written
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise convert.ConversionError(f"{hf_dir}'s tokenizer has {tok.vocab_size} tokens but the "
                                  f"model's vocab_size is {cfg.vocab_size}; give the tokenizer the "
                                  f"checkpoint was trained with.")
  # Training on text reads it with the tokenizer kept in model_dir (loop.make_data).
  run = RunConfig(model=cfg, data=DataConfig(vocab_size=tok.vocab_size) if tok else DataConfig())
  files = tok.files() if tok is not None else None
  count = loop.write_params_run(model_dir, run, convert.from_hf(weights.read, cfg, arch), files,
                                seed)
  return {"arch": arch, "model_dir": model_dir, "tensors": len(weights.shapes),
          "params": count,
          "tokenizer": sorted(files or ())}
