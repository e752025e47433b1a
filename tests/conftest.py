"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data dir for this test session; embedded datasets are built into it on first use."""
    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    os.environ["TFDS_DATA_DIR"] = path
    return path
