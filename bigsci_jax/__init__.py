"""bigsci_jax: decide how to build a >100B multilingual LM from small experiments."""

__version__ = "0.1.0"
