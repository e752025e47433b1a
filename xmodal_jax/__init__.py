"""xmodal_jax: cross-modal (vision + text) object recognition by transfer learning, in JAX."""

from xmodal_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before JAX starts its backend (see xla_defaults)

__version__ = "0.1.0"
