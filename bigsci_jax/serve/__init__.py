"""Serving a trained run: an OpenAI-compatible completions server (python -m bigsci_jax.serve)."""
