"""Data-parallel SG-MCMC for Bayesian neural networks with exact resume."""

__version__ = "0.1.0"
