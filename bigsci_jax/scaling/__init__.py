"""Scaling laws: the runs table, the fits (Kaplan; Chinchilla approaches 1, 2, 3) and,
through `bigsci_jax.flops`, the parameter and FLOP accounting they share with training.

Command line: `python -m bigsci_jax.scaling fit --approach 1|2|3|kaplan --runs CSV`.
"""

from bigsci_jax.flops import CONVENTIONS, flops_per_token, param_counts  # noqa: F401
