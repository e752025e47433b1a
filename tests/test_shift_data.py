"""The domain-shift datasets: full MNIST, MNIST-M-like, SynDigits-like and the ImageNet-C
corruptions of the 28x28 datasets: counts, shapes, determinism, balance, severity, names."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from xmodal_jax.data import assets, builders, corruptions, digit_shifts, pipeline
from xmodal_jax.errors import UserError

SHIFT_NAMES = digit_shifts.NAMES + corruptions.NAMES


def _split(name, data_dir, split):
    b = tfds.builder(name, data_dir=data_dir)
    b.download_and_prepare()
    src = b.as_data_source(split=split)
    images = np.stack([src[i]["image"] for i in range(len(src))])
    labels = np.array([src[i]["label"] for i in range(len(src))])
    return b, images, labels


@pytest.fixture
def small(monkeypatch):
    """Tiny builds, each into a test's own data dir: the first 100 digits of each MNIST split,
    100 / 30 rendered digits, and the first 12 animals of each split corrupted."""
    full = assets.mnist()
    monkeypatch.setattr(
        assets, "mnist", lambda: {k: (x[:100], y[:100]) for k, (x, y) in full.items()}
    )
    monkeypatch.setattr(digit_shifts.SynDigitsLike, "NUM_EXAMPLES", {"train": 100, "test": 30})

    def first(fn, n):
        return lambda split: tuple(a[:n] for a in fn(split))

    animals = corruptions.animal_silhouettes_split
    monkeypatch.setattr(
        corruptions.AnimalSilhouettesC, "CLEAN_SPLIT", staticmethod(first(animals, 12))
    )


def test_shift_names_are_embedded_and_say_like():
    assert set(SHIFT_NAMES) <= set(builders.EMBEDDED)
    # Approximations of MNIST-M and SynDigits say so in their names.
    assert [n for n in SHIFT_NAMES if "mnist_m" in n or "syn_digits" in n] == [
        "mnist_m_like",
        "syn_digits_like",
    ]
    for name in ("mnist_m_like", "syn_digits_like"):
        assert "-like" in tfds.builder_cls(name).DESCRIPTION.split(":")[0]


def test_full_mnist_file_splits():
    data = assets.mnist()
    assert {k: len(y) for k, (_, y) in data.items()} == {
        "train": 50000,
        "validation": 10000,
        "test": 10000,
    }
    images, labels = data["test"]
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    # MNIST's test set has these class counts; pixels came back to whole bytes.
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and not images.flags.writeable


@pytest.mark.parametrize(
    "name, shape, splits",
    [
        ("digits_mnist", (28, 28, 1), {"train": 100, "validation": 100, "test": 100}),
        ("mnist_m_like", (28, 28, 3), {"train": 100, "validation": 100, "test": 100}),
        ("syn_digits_like", (32, 32, 3), {"train": 100, "test": 30}),
    ],
)
def test_digit_builders_counts_shapes_determinism(name, shape, splits, small, tmp_path):
    b, images, labels = _split(name, str(tmp_path / "a"), "test")
    assert {k: v.num_examples for k, v in b.info.splits.items()} == splits
    assert images.shape[1:] == shape and images.dtype == np.uint8
    assert b.info.features["label"].names == list(builders.DIGIT_NAMES)
    _, again, labels_again = _split(name, str(tmp_path / "b"), "test")
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert len(set(labels.tolist())) == 10


def test_mnist_m_like_builder_blends_mnist(small, tmp_path):
    digits, labels = assets.mnist()["test"]
    _, blended, got = _split("mnist_m_like", str(tmp_path), "test")
    assert np.array_equal(np.sort(got), np.sort(labels))
    expect = digit_shifts.blend_with_photos(digits, digit_shifts.MNIST_M_SEED + 2)
    assert sorted(map(bytes, blended)) == sorted(map(bytes, expect))
    background = blended[np.repeat(digits[..., None], 3, -1) == 0].reshape(-1, 3)
    assert np.mean(np.ptp(background, axis=-1) > 8) > 0.3  # colour photos, not grey


def test_mnist_m_recipe(monkeypatch):
    """|patch - digit| per channel, the patch a 28x28 crop of a photo (or its mirror image)."""
    photo = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    monkeypatch.setattr(digit_shifts, "photo_pyramid", lambda: (photo,))
    digits = np.zeros((8, 28, 28), np.uint8)
    digits[:, 10:18, 12:16] = 255
    digits[:, 5, 5] = 100
    out = digit_shifts.blend_with_photos(digits, seed=1)
    assert out.shape == (8, 28, 28, 3) and out.dtype == np.uint8
    crops = {
        bytes(np.ascontiguousarray(p[y : y + 28, x : x + 28]))
        for p in (photo, photo[:, ::-1])
        for y in range(13)
        for x in range(9)
    }
    for image, digit in zip(out, digits, strict=True):
        patch = image.astype(int).copy()
        patch[digit == 255] = 255 - patch[digit == 255]  # |p - 255| = 255 - p
        strokes = digit == 100
        found = [
            c
            for c in crops
            if np.array_equal(
                np.frombuffer(c, np.uint8).reshape(28, 28, 3)[~strokes], patch[~strokes]
            )
        ]
        assert len(found) == 1
        p = np.frombuffer(found[0], np.uint8).reshape(28, 28, 3).astype(int)
        assert np.array_equal(image[strokes], np.abs(p[strokes] - 100))


def test_syn_digits_like_balanced_and_varied():
    images, labels = digit_shifts.render_digits(200, seed=3)
    assert np.bincount(labels, minlength=10).tolist() == [20] * 10
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    # Every image has contrast (the text differs from the background) and they differ.
    assert np.all(images.reshape(200, -1).std(axis=1) > 5)
    assert len({im.tobytes() for im in images}) == 200
    again, _ = digit_shifts.render_digits(200, seed=3)
    assert np.array_equal(images, again)


def test_syn_digits_fonts_draw_ten_distinct_digits():
    from PIL import Image, ImageDraw

    for name in digit_shifts.SYN_FONTS:
        font = digit_shifts._font(name, 24)
        glyphs = set()
        for d in "0123456789":
            img = Image.new("L", (32, 32))
            ImageDraw.Draw(img).text((16, 16), d, fill=255, font=font, anchor="mm")
            assert img.getbbox() is not None, (name, d)
            glyphs.add(img.tobytes())
        assert len(glyphs) == 10, name


@pytest.mark.parametrize("corruption", corruptions.CORRUPTIONS)
def test_every_corruption_runs_at_severity_1_and_5(corruption):
    images, _ = assets.animal_mnist()
    for severity in (1, 5):
        for i, image in enumerate(images[:3]):
            out = corruptions.corrupt(image[..., None], corruption, severity, seed=i)
            assert out.shape == (28, 28, 3) and out.dtype == np.uint8
            again = corruptions.corrupt(image[..., None], corruption, severity, seed=i)
            assert np.array_equal(out, again)


@pytest.mark.parametrize(
    "corruption", ["gaussian_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness"]
)
def test_severity_is_monotone(corruption):
    """Mean absolute difference from the clean image grows with the severity."""
    images, _ = assets.animal_mnist()
    clean = np.repeat(images[:20, ..., None], 3, axis=-1).astype(float)
    distance = []
    for severity in corruptions.SEVERITIES:
        out = [corruptions.corrupt(x, corruption, severity, seed=i) for i, x in enumerate(clean)]
        distance.append(np.abs(np.stack(out) - clean).mean())
    assert np.all(np.diff(distance) > 0), distance


def test_impulse_noise_amount():
    out = corruptions.corrupt(np.full((28, 28, 1), 128, np.uint8), "impulse_noise", 5, seed=0)
    changed = np.mean(out != 128)
    assert abs(changed - corruptions._IMPULSE_AMOUNTS[4]) < 0.03


def test_corrupted_builder(small, tmp_path):
    name = "animal_silhouettes_c/gaussian_noise_3"
    b, images, labels = _split(name, str(tmp_path / "a"), "test")
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"test": 12, "train": 12}
    assert images.shape == (12, 28, 28, 3) and images.dtype == np.uint8
    assert b.info.features["label"].names == list(builders.ANIMAL_NAMES)
    _, again, _ = _split(name, str(tmp_path / "b"), "test")
    assert np.array_equal(images, again)
    # The clean test images, corrupted: the same labels, and each image near its clean one.
    keys, clean, clean_labels = corruptions.AnimalSilhouettesC.CLEAN_SPLIT("test")
    assert sorted(labels.tolist()) == sorted(clean_labels.tolist())
    diffs = [
        np.abs(images.astype(int) - np.repeat(c[None, ..., None], 3, -1)).mean(axis=(1, 2, 3)).min()
        for c in clean
    ]
    assert max(diffs) < 40  # noise of severity 3, not another image
    # Another config is another dataset, which the pipeline builds on first use.
    fog = pipeline.source("animal_silhouettes_c/fog_3", "test", str(tmp_path / "a"))
    assert len(fog) == 12 and fog[0]["image"].shape == (28, 28, 3)
    assert not np.array_equal(np.stack([fog[i]["image"] for i in range(12)]), images)


@pytest.mark.parametrize("split", ["test", "train"])
def test_corrupted_clean_splits_are_the_builders(split, tmp_path):
    """The `_c` splits corrupt exactly the examples, under the same keys, of the clean
    `animal_silhouettes` splits."""
    clean = tfds.builder("animal_silhouettes", data_dir=str(tmp_path))
    examples = clean._split_generators(None)[split]
    keys, images, labels = corruptions.animal_silhouettes_split(split)
    n = 0
    for (key, ex), k, image, label in zip(examples, keys, images, labels, strict=True):
        assert key == k and ex["label"] == label and np.array_equal(ex["image"][..., 0], image)
        n += 1
    assert n == {"test": 2000, "train": 8000}[split]


def test_mnist_c_train_subset_is_stratified():
    b = tfds.builder("digits_mnist_c/contrast_1", data_dir="/nonexistent")
    keys, _, labels = b.split_arrays("train")
    assert len(keys) == 10000 and len(set(keys.tolist())) == 10000
    quota = np.bincount(assets.mnist()["train"][1]) * 10000 / 50000
    assert np.all(np.abs(np.bincount(labels) - quota) <= 1)


def test_bad_corruption_input_is_one_user_error(tfds_dir):
    image = np.zeros((28, 28, 1), np.uint8)
    with pytest.raises(UserError, match="Unknown corruption 'fogg'"):
        corruptions.corrupt(image, "fogg", 1, seed=0)
    with pytest.raises(UserError, match="severity 6"):
        corruptions.corrupt(image, "fog", 6, seed=0)
    with pytest.raises(UserError, match="shape"):
        corruptions.corrupt(np.zeros((28, 28)), "fog", 1, seed=0)
    with pytest.raises(UserError, match="no config 'fog_6'.*'fog_5'"):
        pipeline.source("digits_mnist_c/fog_6", "test")
    with pytest.raises(UserError, match="has no configs"):
        pipeline.source("digits_mnist/fog_1", "test")


def test_missing_corrupt_tta_is_a_user_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "corrupt_tta", None)  # import fails
    with pytest.raises(UserError, match="corrupt-tta==0.1.7"):
        tfds.builder("animal_silhouettes_c/fog_1", data_dir=str(tmp_path)).download_and_prepare()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, splits",
    [
        ("digits_mnist", {"train": 50000, "validation": 10000, "test": 10000}),
        ("mnist_m_like", {"train": 50000, "validation": 10000, "test": 10000}),
        ("syn_digits_like", {"train": 20000, "test": 5000}),
        ("animal_silhouettes_c/frost_5", {"train": 8000, "test": 2000}),
        ("digits_mnist_c/glass_blur_5", {"train": 10000, "test": 10000}),
    ],
)
def test_full_builds(name, splits, tfds_dir):
    b = tfds.builder(name, data_dir=tfds_dir)
    b.download_and_prepare()
    assert {k: v.num_examples for k, v in b.info.splits.items()} == splits
    labels = pipeline.split_labels(name, "test")
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0.8 * len(labels) / 10  # no class much rarer than the others


def test_missing_asset_package_is_a_user_error_with_its_pip_line(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "skimage" else find_spec(name)
    )
    digit_shifts.photo_pyramid.cache_clear()
    with pytest.raises(UserError, match="scikit-image==0.26.0") as e:
        pipeline.source("mnist_m_like", "test", str(tmp_path))
    assert "TFDS_DATA_DIR" not in str(e.value)
    digit_shifts.photo_pyramid.cache_clear()
