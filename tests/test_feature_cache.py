"""Feature cache: hits and misses, what changes the key, random preprocessing, and the task's
use of it (a second run does not recompute the locked tower)."""

import grain
import numpy as np
import pytest
from twotower_testing import tiny_config

from xmodal_jax import tasks
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.tasks import feature_cache

UCI = {"name": "digits_uci", "split": "test", "pp": "value_range(0, 1, in_hi=16)"}


class CountingTower:
    """A linear 'tower' x -> flatten(x) @ w that counts the images it has seen."""

    def __init__(self, seed=0):
        self.w = np.random.default_rng(seed).normal(size=(64, 5)).astype(np.float32)
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return {"pooled": images.reshape(len(images), -1) @ self.w}

    def description(self):
        return {"name": "linear", "weights": feature_cache.weights_digest({"w": self.w})}


def outputs(tower, cache, data=UCI):
    return feature_cache.tower_outputs(
        tower, data, tower=tower.description(), batch_size=100, cache=cache
    )


def test_miss_then_hit_and_values(tfds_dir, tmp_path):
    cache, tower = feature_cache.FeatureCache(str(tmp_path)), CountingTower()
    first = outputs(tower, cache)
    n = len(pipeline.source("digits_uci", "test"))
    assert (cache.misses, cache.hits) == (1, 0) and tower.seen >= n
    # Values: the tower applied to every preprocessed example, in split order (float64 ref).
    src, pp = pipeline.source("digits_uci", "test"), preprocess.compose(UCI["pp"])
    x = np.stack([pp(src[i])["image"] for i in range(n)]).reshape(n, -1).astype(np.float64)
    np.testing.assert_allclose(
        first["pooled"], x @ tower.w.astype(np.float64), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(first["label"], [src[i]["label"] for i in range(n)])
    np.testing.assert_array_equal(first["index"], np.arange(n))

    seen = tower.seen
    again = outputs(tower, feature_cache.FeatureCache(str(tmp_path)))  # a new process, say
    assert tower.seen == seen  # nothing recomputed
    np.testing.assert_array_equal(again["pooled"], first["pooled"])


def test_preprocessing_weights_and_data_change_the_key(tfds_dir, tmp_path):
    cache, tower = feature_cache.FeatureCache(str(tmp_path)), CountingTower()
    outputs(tower, cache)
    outputs(tower, cache, {**UCI, "pp": "value_range(0, 2, in_hi=16)"})  # other preprocessing
    assert cache.misses == 2
    outputs(CountingTower(seed=1), cache)  # other weights
    assert cache.misses == 3
    outputs(tower, cache, {**UCI, "split": "train"})  # other data
    assert cache.misses == 4
    outputs(tower, cache)
    assert (cache.misses, cache.hits) == (4, 1)
    assert len(list((tmp_path / "features").glob("*.npz"))) == 4


def test_damaged_entry_is_recomputed(tfds_dir, tmp_path):
    cache, tower = feature_cache.FeatureCache(str(tmp_path)), CountingTower()
    outputs(tower, cache)
    (path,) = (tmp_path / "features").glob("*.npz")
    path.write_bytes(b"truncated")
    outputs(tower, cache)
    assert cache.misses == 2 and cache.load(path.stem) is not None


def test_random_preprocessing_is_detected_and_never_cached(tfds_dir, tmp_path):
    example = {"image": np.zeros((8, 8, 1), np.uint8)}
    assert not feature_cache.uses_randomness("invert|resize(16)|grey_to_rgb", example)
    assert feature_cache.uses_randomness("resize(16)|flip_lr", example)
    assert feature_cache.uses_randomness("random_crop(6, pad=1)", example)
    with pytest.raises(ValueError, match="random numbers"):
        outputs(
            CountingTower(), feature_cache.FeatureCache(str(tmp_path)), {**UCI, "pp": "flip_lr"}
        )


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "elsewhere"))
    assert feature_cache.FeatureCache().dir == str(tmp_path / "elsewhere" / "features")
    assert feature_cache.cache_root("/x") == "/x"


def test_task_second_run_reads_the_cache(tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    c = tiny_config()
    first = tasks.build(c)
    assert first.image_cached and first.text_cached
    a = first.cached_image_features(first.data)
    assert first._cache.misses == 1
    second = tasks.build(c)
    b = second.cached_image_features(second.data)
    assert (second._cache.misses, second._cache.hits) == (0, 1)
    np.testing.assert_array_equal(a["pooled"], b["pooled"])
    c.seed = 1  # the locked random tower gets other weights: a new key
    third = tasks.build(c)
    third.cached_image_features(third.data)
    assert third._cache.misses == 1
    # Random augmentation: the locked tower runs in the step instead.
    c.data.pp = "flip_lr|" + c.data.pp
    c.model.image_proj.norm = "none"
    augmented = tasks.build(c)
    assert not augmented.image_cached and augmented.text_cached


def test_batches_in_threads_keep_their_order_and_a_bounded_window():
    import threading
    import time

    running, most, lock = [0], [0], threading.Lock()

    def slow_square(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (i % 3))  # later items may finish first
        with lock:
            running[0] -= 1
        return i * i

    drawn = []

    def items():
        for i in range(20):
            drawn.append(i)
            yield i

    out = []
    for value in feature_cache.in_threads(slow_square, items(), 2):
        out.append(value)
        assert len(drawn) - len(out) <= 4  # at most 2 x workers drawn and not yet yielded
    assert out == [i * i for i in range(20)] and most[0] <= 2
    assert list(feature_cache.in_threads(slow_square, range(5), 1)) == [0, 1, 4, 9, 16]


def test_outputs_computed_in_two_threads_are_the_serial_ones(tfds_dir, tmp_path, monkeypatch):
    tower = CountingTower()
    serial = outputs(tower, feature_cache.FeatureCache(str(tmp_path / "a")))
    monkeypatch.setattr(feature_cache, "concurrent_batches", lambda: 2)
    threaded = outputs(tower, feature_cache.FeatureCache(str(tmp_path / "b")))
    for k in serial:
        np.testing.assert_array_equal(threaded[k], serial[k])


@pytest.mark.parametrize(
    "n, batch, processes, seed", [(37, 8, 2, 0), (50, 12, 3, 2**32 - 2), (16, 16, 1, 5)]
)
def test_whole_batches_are_grains_shuffled_rows(n, batch, processes, seed):
    """Gathered batch by batch, the training batches hold the rows grain's own
    `source.shuffle(seed).repeat().batch()[p::P]` gives, in its order, across epoch ends (n is
    not a multiple of the batch), seeds near 2**32 and process shares; the iterator state is
    grain's too, so checkpoints of either resume the other."""
    rng = np.random.default_rng(0)
    fields = {
        "image_feats": rng.normal(size=(n, 3)).astype(np.float32),
        "label": rng.integers(0, 9, n).astype(np.int32),
        "index": np.arange(n),
    }
    grains = lambda ds: ds.shuffle(seed=seed).repeat()
    for p in range(processes):
        kw = dict(batch_size=batch, seed=seed, process_index=p, process_count=processes)
        ours = feature_cache.train_dataset(fields, where="x", **kw)
        reference = grain.MapDataset.source(feature_cache._ArraySource(fields))
        reference = grains(reference).batch(batch // processes, drop_remainder=True)
        reference = reference[p::processes]
        assert len(ours) == len(reference)
        for b in [*range(40), 12345]:
            got, want = ours[b], reference[b]
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype
                np.testing.assert_array_equal(got[k], want[k])
        it, ref_it = iter(ours.to_iter_dataset()), iter(reference.to_iter_dataset())
        for _ in range(5):
            next(it), next(ref_it)
        assert it.get_state() == ref_it.get_state()
        ref_it.set_state(it.get_state())
        np.testing.assert_array_equal(next(it)["index"], next(ref_it)["index"])


def test_row_subsets_and_stacked_streams_read_what_copies_would():
    """`rows=` shuffles those rows in place, as a copy of them would be; a stacked dataset's
    batch is each stream's batch, stacked on axis 1 (a head per stream)."""
    rng = np.random.default_rng(1)
    n = 90
    fields = {"image_feats": rng.normal(size=(n, 4)).astype(np.float32), "index": np.arange(n)}
    subsets = [np.flatnonzero(rng.random(n) < 0.5), None, np.arange(0, n, 3)]
    seeds = [3, 2**32 - 1, 40]
    for p, processes in [(0, 1), (1, 2)]:
        kw = dict(batch_size=16, process_index=p, process_count=processes, where="x")
        stacked = feature_cache.stacked_train_dataset(fields, subsets, seeds, **kw)
        alone = []
        for rows, seed in zip(subsets, seeds, strict=True):
            in_place = feature_cache.train_dataset(fields, seed=seed, rows=rows, **kw)
            copied = {k: v if rows is None else v[rows] for k, v in fields.items()}
            copy = feature_cache.train_dataset(copied, seed=seed, **kw)
            for b in (0, 1, 7, 999):
                for k in fields:
                    np.testing.assert_array_equal(in_place[b][k], copy[b][k])
            alone.append(in_place)
        for b in (0, 5, 999):
            for k in fields:
                want = np.stack([ds[b][k] for ds in alone], axis=1)
                np.testing.assert_array_equal(stacked[b][k], want)
    with pytest.raises(UserError, match="fewer than the batch"):
        feature_cache.stacked_train_dataset(fields, [np.arange(5)], [0], **kw)
