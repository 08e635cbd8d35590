"""Attention for every model path: `attention(q, k, v, ...)` (DESIGN.md, "Attention").

Installed as `bigsci_jax.kernels`; imports nothing else from bigsci_jax, so it can
be tested and benchmarked alone. The dispatch by `impl` is in dispatch.py.
"""

if __name__ == "kernels":
  # This folder is a top-level `kernels` only when the repository root is on sys.path
  # (python -m from the root, a notebook there), where it hides the pip package of that
  # name: Hugging Face's `kernels`, which transformers imports. That package is loaded
  # in its place; without one there is no `kernels` module, as anywhere else.
  import importlib.machinery
  import importlib.util
  import os
  import sys
  _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _spec = importlib.machinery.PathFinder.find_spec(
      __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
  if _spec is None:
    raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
  sys.modules[__name__] = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(sys.modules[__name__])
else:
  from bigsci_jax.kernels.cached import cached_attention
  from bigsci_jax.kernels.dispatch import IMPLS, attention, auto_impl
  from bigsci_jax.kernels.mask import visibility_BxTxS

  __all__ = ["attention", "auto_impl", "cached_attention", "visibility_BxTxS", "IMPLS"]
