"""Adapter directories: what python -m bigsci_jax.prompt_tune writes and --prompt_dir
reads in evaluate, generate, serve and the lm_eval adapter.

Two kinds, told apart by prompt.json's "kind":
  soft_prompt  P virtual-token embeddings [P, D] (adapt.soft_prompt), orbax `embeddings/`;
  lora         low-rank factors of the attention projections (adapt.lora), orbax `lora/`,
               with their rank, alpha and targets.
prompt.json also holds the base model's shape, the task, how it was tuned and the
scores measured before and after. A directory is written to a temporary sibling and
renamed into place, so it is complete or absent. (A prompt.json without "kind" is a
soft prompt: directories written before LoRA existed.)
"""

import json
import os
import shutil

import jax
import numpy as np

from bigsci_jax.adapt import lora, soft_prompt

PROMPT_FILE = "prompt.json"
KINDS = {"soft_prompt": "embeddings", "lora": "lora"}  # kind -> its arrays' subdirectory
# The fields that decide whether an adapter's arrays mean anything to a model.
SHAPE_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                "vocab_size")


class AdapterError(ValueError):
  """An adapter cannot be saved or used as asked; the message says why."""


def model_shape(model_cfg):
  return {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}


def save(out_dir, kind, arrays, model_cfg, info):
  """Write `arrays` (the [P, D] prompt, or the LoRA factor tree) and prompt.json (kind,
  info, the model's shape) to out_dir. An existing out_dir is replaced only if it is
  itself an adapter directory."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(
      os.path.join(out_dir, PROMPT_FILE)):
    raise AdapterError(f"--out {out_dir} exists and is not an adapter directory; pass a new "
                       f"or empty directory.")
  import orbax.checkpoint as ocp
  tmp = out_dir + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tree = jax.tree.map(lambda x: np.asarray(x, np.float32),
                      {"embeddings": arrays} if kind == "soft_prompt" else arrays)
  ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
      os.path.join(tmp, KINDS[kind]), args=ocp.args.StandardSave(tree))
  meta = {**info, "kind": kind, "model": model_shape(model_cfg)}
  if kind == "soft_prompt":
    meta["num_virtual_tokens"] = int(tree["embeddings"].shape[0])
  with open(os.path.join(tmp, PROMPT_FILE), "w") as f:
    f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return out_dir


def read_info(prompt_dir):
  """prompt.json of an adapter directory, with its "kind" filled in."""
  path = os.path.join(prompt_dir, PROMPT_FILE)
  if not os.path.isfile(path):
    raise AdapterError(f"{prompt_dir} is not an adapter directory (no {PROMPT_FILE}); make one "
                       f"with python -m bigsci_jax.prompt_tune.")
  with open(path) as f:
    info = json.load(f)
  info.setdefault("kind", "soft_prompt")
  if info["kind"] not in KINDS:
    raise AdapterError(f"{path} names kind {info['kind']!r}; this version reads "
                       f"{' and '.join(KINDS)}.")
  return info


def load(prompt_dir, model_cfg, params=None):
  """(info, arrays) of an adapter made for a model of model_cfg's shape: the [P, D]
  float32 prompt, or the LoRA factor tree (params, the model's, give its shapes)."""
  info = read_info(prompt_dir)
  wanted = model_shape(model_cfg)
  for field in SHAPE_FIELDS:  # the first that differs, widest first
    if field in info["model"] and info["model"][field] != wanted[field]:
      raise AdapterError(f"the adapter in {prompt_dir} was tuned for a model with "
                         f"{field}={info['model'][field]}, and this model has "
                         f"{field}={wanted[field]}: tune one for this model.")
  import orbax.checkpoint as ocp
  if info["kind"] == "soft_prompt":
    shape = (info["num_virtual_tokens"], model_cfg.d_model)
    target = {"embeddings": jax.ShapeDtypeStruct(shape, np.float32)}
  else:
    target = lora.shapes(params, info["rank"], tuple(info["targets"]))
  restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
      os.path.join(os.path.abspath(prompt_dir), KINDS[info["kind"]]),
      args=ocp.args.StandardRestore(target))
  restored = jax.tree.map(np.asarray, restored)
  return info, restored["embeddings"] if info["kind"] == "soft_prompt" else restored


def attach_dir(params, prompt_dir, model_cfg):
  """params with the adapter of prompt_dir applied (a soft prompt attached, or LoRA
  factors merged into the kernels); params themselves when prompt_dir is empty or None."""
  if not prompt_dir:
    return params
  info, arrays = load(prompt_dir, model_cfg, params)
  if info["kind"] == "soft_prompt":
    return soft_prompt.attach(params, arrays)
  return lora.merged(params, arrays, info["alpha"] / info["rank"])


def describe(prompt_dir):
  """What a server reports about the adapter it applies."""
  info = read_info(prompt_dir)
  keys = ("num_virtual_tokens",) if info["kind"] == "soft_prompt" else ("rank", "alpha",
                                                                        "targets")
  return {"prompt_dir": prompt_dir, "kind": info["kind"], "task": info.get("task"),
          **{k: info[k] for k in keys}}
