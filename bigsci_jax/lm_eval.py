"""EleutherAI lm-evaluation-harness adapter: importing this module registers the
model `bigsci_jax` with the harness (the optional `[eval]` extra, package lm-eval).

  python -m bigsci_jax.lm_eval --model bigsci_jax --model_args model_dir=DIR[,prompt_dir=P][,offload=host][,mesh=1x1x4] \
      --tasks lambada_openai,hellaswag [--num_fewshot 5] [--batch_size 16] [--include_path DIR]

hands every argument unchanged to the harness's own command line, after the
import that registers the model (the stock `lm_eval` command only knows its own
models). In process: `lm_eval.simple_evaluate(model=BigsciLM(model_dir=DIR), ...)`.

Requests are scored by likelihood.Scorer: batched (sorted by length), on every
device of the data-parallel mesh when they divide the batch (or over the mesh that
`mesh=DATAxFSDPxTENSOR` names, e.g. 1x1x4 for a model split over 4 devices), the tokenizer's byte
fallback spelling any text, context and continuation encoded apart (whitespace
ending the context moves into the continuation); for a prefix LM the context is
the bidirectional prefix. Contexts too long for the window lose tokens from the
left (the harness's convention; generation logs a warning). Generation is greedy
unless the task's gen_kwargs ask for do_sample, and stops at EOS or a stop
string; max_gen_toks is capped at half the window so a context keeps room.
One process: multi-host evaluation is not supported.
"""

import json
import logging
import sys

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra
  raise ImportError("the lm-evaluation-harness adapter needs the [eval] extra: "
                    "pip install -e '.[eval]'.") from e

from bigsci_jax import generate
from bigsci_jax.evaluate import EvaluationError

log = logging.getLogger(__name__)


@register_model("bigsci_jax")
class BigsciLM(LM):
  """A bigsci_jax run's latest checkpoint (model_dir) as a harness model."""

  def __init__(self, model_dir=None, batch_size=None, max_batch_size=None, device=None,
               prompt_dir=None, offload="none", mesh=None, *, scorer=None, **unknown):
    super().__init__()
    if unknown:
      raise EvaluationError(f"unknown model_args {sorted(unknown)} for bigsci_jax: it takes "
                            f"model_dir, batch_size, prompt_dir, offload and mesh.")
    if scorer is None:
      if not model_dir:
        raise EvaluationError("the bigsci_jax model needs --model_args model_dir=DIR "
                              "(a train.py run).")
      from bigsci_jax import evaluate
      size = int(batch_size) if batch_size not in (None, "", "auto") else None
      run, runtime, params, self.step = evaluate.restore(model_dir, size, offload, mesh)
      scorer = evaluate.make_scorer(model_dir, run, runtime, params, size, prompt_dir)
    self.scorer = scorer

  @classmethod
  def from_scorer(cls, scorer):
    """An adapter over any likelihood.Scorer (e.g. freshly initialised params)."""
    return cls(scorer=scorer)

  def loglikelihood(self, requests, disable_tqdm=False):
    args = [r.args for r in requests]
    sums, greedy = self.scorer.loglikelihood(args)
    out = [(float(s), bool(g)) for s, g in zip(sums, greedy)]
    for a, o in zip(args, out):
      self.cache_hook.add_partial("loglikelihood", a, o)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    texts = [r.args[0] for r in requests]
    out = [float(s) for s in self.scorer.loglikelihood_rolling(texts)]
    for t, o in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (t,), o)
    return out

  def generate_until(self, requests, disable_tqdm=False):
    """Requests grouped by their gen_kwargs; each group generated in batches."""
    groups = {}
    for i, r in enumerate(requests):
      context, kwargs = r.args
      groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
    out = [None] * len(requests)
    max_len = self.scorer.model.cfg.max_len
    for key, ids in groups.items():
      kwargs = json.loads(key)
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))
      if max_new > max_len // 2:
        log.warning("max_gen_toks=%d capped at %d, half the context window", max_new, max_len // 2)
        max_new = max_len // 2
      sampling = generate.Sampling()
      if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
        sampling = generate.Sampling(float(kwargs.get("temperature", 1.0)),
                                     int(kwargs.get("top_k") or 0),
                                     float(kwargs.get("top_p") or 1.0))
      texts = self.scorer.generate_until([requests[i].args[0] for i in ids], until, max_new,
                                         sampling, seed=int(kwargs.get("seed", 0)))
      for i, text in zip(ids, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def main(argv):
  """The harness's command line with `bigsci_jax` registered; rc 2 and one sentence
  for a model_dir that cannot be evaluated."""
  from lm_eval.__main__ import cli_evaluate
  from bigsci_jax import likelihood, loop
  from bigsci_jax.adapt.store import AdapterError
  sys.argv = ["lm-eval", *argv]
  try:
    cli_evaluate()
  except (loop.RunNotFound, EvaluationError, likelihood.LikelihoodError, AdapterError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
