"""Data: embedded TFDS builders (registered on import), Grain pipelines, preprocessing."""

import xmodal_jax.data.office31  # noqa: F401  (registers the manual-download builder office31)
from xmodal_jax.data import builders  # noqa: F401  (registers the embedded datasets with TFDS)
