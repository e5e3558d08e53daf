"""Evaluation of single weights and of the Bayesian model average over posterior samples."""
