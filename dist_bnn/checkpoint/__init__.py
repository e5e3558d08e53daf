"""Checkpoints: DCP shards of model and optimizer, per-rank RNG files and a JSON manifest."""
