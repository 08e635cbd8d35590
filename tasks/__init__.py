"""seqio Task and Mixture registrations (installed as `bigsci_jax.tasks`).

handbook.py registers the handbook corpora's tasks and mixtures, vocabularies.py
their SentencePiece vocabularies; the data pipeline imports them. Only this package
and the data pipeline may import seqio / TensorFlow.
"""
