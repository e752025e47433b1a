"""Data: embedded TFDS builders (registered on import), Grain pipelines, preprocessing."""

from xmodal_jax.data import builders  # noqa: F401  (registers the embedded datasets with TFDS)
