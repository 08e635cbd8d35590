"""Soft prompts (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): P virtual-token embeddings [P, D] that start every input of a frozen model.

A prompt is attached to a model's params as the entry model.SOFT_PROMPT; the model
then reads the negative token ids -1 .. -P (model.soft_prompt_ids) as its rows.
Everything that reads params — likelihood.Scorer, generate.generate, the serving
engine — puts those ids after BOS in every row (inside a prefix LM's bidirectional
prefix), so a prompt needs nothing else from its users.

A prompt is saved and loaded as an adapter directory (adapt.store).
"""

import jax
import jax.numpy as jnp
import numpy as np

from bigsci_jax.model import SOFT_PROMPT
from bigsci_jax.vocab import UNK_ID


def init_from_vocab(params, count, seed=0, pool=5000):
  """[count, D] float32 rows of the embedding table, drawn without replacement from the
  ids after the control pieces and below `pool` (SentencePiece orders pieces by
  score, so these are the common ones; Lester et al. initialise from the 5000 most
  common tokens)."""
  table_VxD = np.asarray(jax.device_get(params["embed"]["embedding"]), np.float32)
  first, last = UNK_ID + 1, min(pool, table_VxD.shape[0])
  if count < 1 or count > last - first:
    raise ValueError(f"num_virtual_tokens={count} must be between 1 and {last - first} (the "
                     f"common vocabulary pieces a prompt is initialised from).")
  ids = first + np.random.default_rng(seed).choice(last - first, count, replace=False)
  return table_VxD[ids]


def attach(params, embeddings_PxD):
  """params with the soft prompt as its SOFT_PROMPT entry (a new dict; params untouched)."""
  return {**params, SOFT_PROMPT: jnp.asarray(embeddings_PxD, jnp.float32)}
