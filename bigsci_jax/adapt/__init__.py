"""Adapting a frozen checkpoint: soft prompts (prompt tuning)."""
