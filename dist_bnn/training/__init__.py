"""The Ignite training engine and the run-level records it keeps (samples, metrics, W&B)."""
