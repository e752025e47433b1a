"""Data: embedded TFDS builders (registered on import), Grain pipelines, preprocessing."""

import xmodal_jax.data.office31  # noqa: F401  (registers the manual-download builder office31)

# Register the embedded datasets with TFDS: the real ones, then the domain-shift ones.
from xmodal_jax.data import builders, corruptions, digit_shifts  # noqa: F401
