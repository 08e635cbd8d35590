"""seqio Task and Mixture registrations (installed as `bigsci_jax.tasks`).

Empty until the data pipeline lands; only this package and the data pipeline
may import seqio / TensorFlow.
"""
