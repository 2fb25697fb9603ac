"""adaserve-jax: SLO-customized speculative decoding (AdaServe) in JAX."""

__version__ = "0.1.0"
