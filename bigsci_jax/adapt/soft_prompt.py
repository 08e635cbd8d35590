"""Soft prompts (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): P virtual-token embeddings [P, D] that start every input of a frozen model.

A prompt is attached to a model's params as the entry model.SOFT_PROMPT; the model
then reads the negative token ids -1 .. -P (model.soft_prompt_ids) as its rows.
Everything that reads params — likelihood.Scorer, generate.generate, the serving
engine — puts those ids after BOS in every row (inside a prefix LM's bidirectional
prefix), so a prompt needs nothing else from its users.

A prompt directory holds the embeddings as an orbax checkpoint (`embeddings/`) and
`prompt.json` (the base model's shape, the task, how it was tuned, and the
accuracies measured before and after). It is written to a temporary sibling and
renamed into place, so a directory is complete or absent.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax.model import SOFT_PROMPT
from bigsci_jax.vocab import UNK_ID

PROMPT_FILE = "prompt.json"
EMBEDDINGS = "embeddings"
# The fields that decide whether a prompt's embeddings mean anything to a model.
SHAPE_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "vocab_size")


class PromptError(ValueError):
  """A soft prompt cannot be made, saved or used as asked; the message says why."""


def init_from_vocab(params, count, seed=0, pool=5000):
  """[count, D] float32 rows of the embedding table, drawn without replacement from the
  ids after the control pieces and below `pool` (SentencePiece orders pieces by
  score, so these are the common ones; Lester et al. initialise from the 5000 most
  common tokens)."""
  table_VxD = np.asarray(jax.device_get(params["embed"]["embedding"]), np.float32)
  first, last = UNK_ID + 1, min(pool, table_VxD.shape[0])
  if count < 1 or count > last - first:
    raise PromptError(f"num_virtual_tokens={count} must be between 1 and {last - first} (the "
                      f"common vocabulary pieces a prompt is initialised from).")
  ids = first + np.random.default_rng(seed).choice(last - first, count, replace=False)
  return table_VxD[ids]


def attach(params, embeddings_PxD):
  """params with the soft prompt as its SOFT_PROMPT entry (a new dict; params untouched)."""
  return {**params, SOFT_PROMPT: jnp.asarray(embeddings_PxD, jnp.float32)}


def model_shape(model_cfg):
  return {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}


def save(out_dir, embeddings_PxD, model_cfg, info):
  """Write the prompt and prompt.json (info plus the model's shape) to out_dir. An existing
  out_dir is replaced only if it is itself a prompt directory."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(
      os.path.join(out_dir, PROMPT_FILE)):
    raise PromptError(f"--out {out_dir} exists and is not a soft-prompt directory; pass a new "
                      f"or empty directory.")
  import orbax.checkpoint as ocp
  tmp = out_dir + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  embeddings_PxD = np.asarray(embeddings_PxD, np.float32)
  ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
      os.path.join(tmp, EMBEDDINGS), args=ocp.args.StandardSave({"embeddings": embeddings_PxD}))
  meta = {"num_virtual_tokens": int(embeddings_PxD.shape[0]), "model": model_shape(model_cfg),
          **info}
  with open(os.path.join(tmp, PROMPT_FILE), "w") as f:
    f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return out_dir


def read_info(prompt_dir):
  path = os.path.join(prompt_dir, PROMPT_FILE)
  if not os.path.isfile(path):
    raise PromptError(f"{prompt_dir} is not a soft-prompt directory (no {PROMPT_FILE}); make one "
                      f"with python -m bigsci_jax.prompt_tune.")
  with open(path) as f:
    return json.load(f)


def load(prompt_dir, model_cfg):
  """The [P, D] float32 embeddings of a prompt tuned for a model of model_cfg's shape."""
  info = read_info(prompt_dir)
  wanted = model_shape(model_cfg)
  for field in SHAPE_FIELDS:  # the first that differs, widest first
    if info["model"].get(field) != wanted[field]:
      raise PromptError(f"the soft prompt in {prompt_dir} was tuned for a model with "
                        f"{field}={info['model'].get(field)}, and this model has "
                        f"{field}={wanted[field]}: tune a prompt for this model.")
  import orbax.checkpoint as ocp
  count, d_model = info["num_virtual_tokens"], model_cfg.d_model
  target = {"embeddings": jax.ShapeDtypeStruct((count, d_model), np.float32)}
  restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
      os.path.join(os.path.abspath(prompt_dir), EMBEDDINGS), args=ocp.args.StandardRestore(target))
  return np.asarray(restored["embeddings"])


def attach_dir(params, prompt_dir, model_cfg):
  """params with the prompt of prompt_dir attached; params unchanged when prompt_dir is
  empty or None."""
  if not prompt_dir:
    return params
  return attach(params, load(prompt_dir, model_cfg))
