"""a1_jax: SkyReels-A1 portrait animation in JAX/Flax."""

__version__ = "0.1.0"
