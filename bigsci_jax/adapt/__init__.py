"""Adapting a trained checkpoint: soft prompts and LoRA (prompt_tune), a new language's
vocabulary (extend_vocab)."""
