"""Hugging Face interoperability: a run's vocabulary as a fast tokenizer (tokenizer.py)."""
