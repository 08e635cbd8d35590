"""A run's latest parameters as a transformers checkpoint (BLOOM or Llama architecture).

  python -m bigsci_jax.hf export --model_dir=DIR --out=HF_DIR [--arch=auto|bloom|llama]
      [--dtype=float32|bfloat16] [--shard_gib=5]

Writes config.json, generation_config.json, the weights as safetensors (model.safetensors,
or model-0000i-of-0000n.safetensors with model.safetensors.index.json past --shard_gib)
and the tokenizer (tokenizer.json and its configs, from the run's SentencePiece model).
The parameters stay where the checkpoint restores them: split over every device (as
MeshConfig(data=1, fsdp=-1) splits them), so a model larger than one device's memory
exports; each tensor is gathered and converted on the host as its shard is written, so
the host holds at most one shard of converted tensors. Nothing is written unless the model converts: a model the target
architecture cannot express is refused first. Needs safetensors and tokenizers only.
"""

import json
import os

import numpy as np

from bigsci_jax.hf import convert
from bigsci_jax.vocab import EOS_ID, PAD_ID

DTYPES = ("float32", "bfloat16")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def _numpy_dtype(dtype):
  if dtype == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float32)


def shard_plan(shapes, itemsize, shard_bytes):
  """[[names of shard 1], ...]: tensors in order, a new shard when the next would pass
  shard_bytes (a tensor larger than that gets a shard of its own)."""
  shards, size = [[]], 0
  for name, shape in shapes.items():
    nbytes = int(np.prod(shape)) * itemsize
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def write_weights(tensors, shapes, out_dir, dtype="float32", shard_bytes=5 * 2**30):
  """Write (name, array) pairs from the iterator `tensors` (in the order of `shapes`)
  as safetensors shards; returns the file names written."""
  from safetensors.numpy import save_file
  np_dtype = _numpy_dtype(dtype)
  shards = shard_plan(shapes, np_dtype.itemsize, shard_bytes)
  files = ([WEIGHTS] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for names, file in zip(shards, files):
    shard = {}
    for expected in names:
      name, array = next(tensors)
      assert name == expected and array.shape == tuple(shapes[name]), (name, expected)
      shard[name] = array.astype(np_dtype)
      weight_map[name] = file
    save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
    del shard
  if len(files) > 1:
    total = sum(int(np.prod(s)) * np_dtype.itemsize for s in shapes.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    files.append(INDEX)
  return files


def restore_split(model_dir):
  """(params, step) of model_dir's latest checkpoint split over every device (fsdp; a
  dimension they do not divide stays whole)."""
  import dataclasses
  from bigsci_jax import loop
  from bigsci_jax.config import MeshConfig
  run = loop.read_run(model_dir)
  return loop.Runtime(dataclasses.replace(run, mesh=MeshConfig(1, -1, 1))).restore_params(model_dir)


def export(model_dir, out_dir, arch="auto", dtype="float32", shard_gib=5.0):
  """Export model_dir's latest checkpoint into out_dir; returns a summary dict."""
  from bigsci_jax import loop
  from bigsci_jax import tokenizer as tokenizers
  from bigsci_jax.hf import tokenizer
  if dtype not in DTYPES:
    raise convert.ConversionError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
  run = loop.read_run(model_dir)
  arch = convert.architecture(run.model, arch)
  tok = tokenizers.from_dir(model_dir)
  special = ({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
             if tok else {"bos_token_id": PAD_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
  params, step = restore_split(model_dir)
  os.makedirs(out_dir, exist_ok=True)
  config = convert.hf_config(run.model, arch, bos_id=special["bos_token_id"],
                             eos_id=special["eos_token_id"], pad_id=special["pad_token_id"],
                             dtype=dtype)
  shapes = convert.tensor_shapes(run.model, arch)
  files = write_weights(convert.to_hf(params, run.model, arch), shapes, out_dir, dtype,
                        int(shard_gib * 2**30))
  for name, content in (("config.json", config), ("generation_config.json", special)):
    loop.write_atomic(os.path.join(out_dir, name), json.dumps(content, indent=1) + "\n")
    files.append(name)
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    files += [os.path.basename(p) for p in tokenizer.write(tok.model_proto, out_dir,
                                                           run.model.max_len)]
  elif tok is not None:  # an imported run keeps the tokenizer files it came with
    loop.write_vocab_files(out_dir, tok.files())
    files += list(tok.files())
  return {"arch": arch, "step": step, "dtype": dtype, "tensors": len(shapes),
          "out": out_dir, "files": sorted(files)}
