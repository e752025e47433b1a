"""The embedded TFDS datasets: counts, shapes, dtypes, names, and a split fixed across builds."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from xmodal_jax.data import assets, builders, pipeline

EXPECTED = {
    "animal_silhouettes": ((28, 28, 1), 8000, 2000, builders.ANIMAL_NAMES),
    "digits_mnist5k": ((28, 28, 1), 4000, 1000, builders.DIGIT_NAMES),
    "digits_uci": ((8, 8, 1), 898, 899, builders.DIGIT_NAMES),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_shapes_names(name, tfds_dir):
    shape, n_train, n_test, names = EXPECTED[name]
    b = tfds.builder(name, data_dir=tfds_dir)
    b.download_and_prepare()
    assert b.info.splits["train"].num_examples == n_train
    assert b.info.splits["test"].num_examples == n_test
    assert b.info.features["label"].names == list(names)
    src = b.as_data_source(split="test")
    ex = src[0]
    assert ex["image"].shape == shape and ex["image"].dtype == np.uint8
    labels = np.array([src[i]["label"] for i in range(len(src))])
    # Stratified: each class's test share is within one example of its exact quota.
    _, all_labels = {
        "animal_silhouettes": assets.animal_mnist,
        "digits_mnist5k": assets.mnist5k,
        "digits_uci": assets.uci_digits,
    }[name]()
    quota = np.bincount(all_labels, minlength=10) * n_test / len(all_labels)
    assert np.all(np.abs(np.bincount(labels, minlength=10) - quota) <= 1)


def _split_fingerprint(name, data_dir, split):
    src = tfds.builder(name, data_dir=data_dir)
    src.download_and_prepare()
    s = src.as_data_source(split=split)
    return sorted(s[i]["image"].tobytes() + bytes([s[i]["label"]]) for i in range(len(s)))


def test_split_is_the_same_on_every_build(tmp_path):
    a = _split_fingerprint("digits_uci", str(tmp_path / "a"), "test")
    b = _split_fingerprint("digits_uci", str(tmp_path / "b"), "test")
    assert a == b


def test_stratified_split_exact_size():
    labels = np.repeat(np.arange(3), [5, 7, 11])
    mask = builders.stratified_split(labels, 10, seed=1)
    assert mask.sum() == 10
    assert np.array_equal(mask, builders.stratified_split(labels, 10, seed=1))


def test_digit_images_match_the_packaged_files(tfds_dir):
    images, labels = assets.uci_digits()
    src = pipeline.source("digits_uci", "train")
    packaged = {im.tobytes() + bytes([lab]) for im, lab in zip(images, labels, strict=True)}
    for i in range(0, len(src), 97):
        ex = src[i]
        assert ex["image"][..., 0].tobytes() + bytes([ex["label"]]) in packaged


def test_restricted_unpickler_refuses_code(tmp_path):
    import gzip
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        assets.load_numpy_pickle(str(path))


def test_unknown_dataset_names_closest(tfds_dir):
    from xmodal_jax.errors import UserError

    with pytest.raises(UserError, match="digits_uci"):
        pipeline.source("digits_ucii", "train")
    with pytest.raises(UserError, match="has no split 'validation'"):
        pipeline.source("digits_uci", "validation")
