"""xmodal_jax: cross-modal (vision + text) object recognition by transfer learning, in JAX."""

__version__ = "0.1.0"
