"""On-disk cache of locked-tower outputs.

A tower that is fully frozen and whose input has no random augmentation gives the same output
for an example at every step, so LiT-style training computes it once per dataset split and then
trains only what sits on top. The cache key is a SHA-256 over everything the output depends on:
the tower (its module description and a digest of its weights), the dataset (name, split,
version, size and a digest of three of its examples), the preprocessing spec and the output kept.
A changed weight, preprocessing op or dataset gives a new key, so a stale file is never read.

Files live in `<root>/features/<key>.npz` with a JSON sidecar that spells the key out; the root
is the `root` argument, else `$XMODAL_CACHE`, else `~/.cache/xmodal_jax`. Files are written to a
temporary name and renamed, so a killed run never leaves a truncated entry. With several
processes each one computes and writes the same deterministic file (the last rename wins).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import numpy as np
import tqdm

from xmodal_jax import provenance, timing, xla_defaults
from xmodal_jax.cache_dirs import cache_root
from xmodal_jax.data import index_shuffle, pipeline, preprocess
from xmodal_jax.errors import UserError

FORMAT = 1  # bump when the file layout changes


def _hash_array(h: Any, x: Any) -> None:
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes() if x.dtype.kind != "O" else repr(x.tolist()).encode())


def weights_digest(variables: Any) -> str:
    """SHA-256 over the path, dtype, shape and bytes of every leaf of `variables`."""
    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.unbox(variables))
    for path, leaf in flat:
        h.update(jax.tree_util.keystr(path).encode())
        _hash_array(h, leaf)
    return h.hexdigest()


def source_digest(source: Any) -> dict[str, Any]:
    """Size and a digest of the first, middle and last example of a random-access source."""
    n = len(source)
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1} if n else set()):
        example = source[i]
        for key in sorted(example):
            h.update(key.encode())
            value = example[key]
            if isinstance(value, Mapping):
                for sub in sorted(value):
                    _hash_array(h, value[sub])
            else:
                _hash_array(h, value)
    return {"num_examples": n, "examples_sha256": h.hexdigest()}


class _RecordingGenerator:
    """Stands in for `np.random.Generator` and records whether any op drew from it."""

    def __init__(self):
        self.used = False
        self._rng = np.random.default_rng(0)

    def __getattr__(self, name: str) -> Any:
        self.used = True
        return getattr(self._rng, name)


def uses_randomness(pp_spec: str, example: Mapping[str, Any]) -> bool:
    """Whether preprocessing `pp_spec` draws random numbers (random crops, flips, ...) when
    applied to `example`: such a tower input differs from step to step and cannot be cached."""
    rng = _RecordingGenerator()
    preprocess.compose(pp_spec)(dict(example), rng)
    return rng.used


def key_of(description: Mapping[str, Any]) -> str:
    """The cache key of a JSON-able description (sorted keys, so order does not matter)."""
    text = json.dumps({"format": FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FeatureCache:
    """`<root>/features/<key>.npz` files; counts hits and misses (handy in tests and logs)."""

    def __init__(self, root: str | None = None):
        self.dir = os.path.join(cache_root(root), "features")
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.npz")

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key`, or None if there are none (or the file is unreadable)."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError):
            return None  # a damaged entry is recomputed and overwritten

    def save(self, key: str, arrays: Mapping[str, np.ndarray], description: Mapping) -> str:
        """Writes `arrays` under `key` atomically, with `description` in a JSON sidecar."""
        os.makedirs(self.dir, exist_ok=True)
        path = self.path(key)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
        meta = f"{path[:-4]}.json"
        with open(f"{meta}.{os.getpid()}.tmp", "w") as f:
            json.dump({"format": FORMAT, **description}, f, indent=1, sort_keys=True, default=str)
        os.replace(f"{meta}.{os.getpid()}.tmp", meta)
        return path

    def get_or_compute(
        self, description: Mapping[str, Any], compute: Callable[[], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The cached arrays for `description`, computing and saving them on a miss. Outputs
        computed with XLA's own convolutions on CPU (the project's default, `xla_defaults`)
        differ in the last bits from those of YNNPACK's (entries without the field), so the
        key names them."""
        if xla_defaults.cpu_convolutions() != "ynnpack":
            description = {**description, "cpu_convolutions": xla_defaults.cpu_convolutions()}
        key = key_of(description)
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        self.save(key, arrays, description)
        return arrays


def split_description(data_cfg: Mapping[str, Any], input_key: str) -> dict[str, Any]:
    """What a split's preprocessed `input_key` fields depend on, for a cache key: the dataset
    (name, split, version, size, a digest of three examples), the preprocessing and the field.
    One error when the preprocessing draws random numbers (nothing about it could be cached)."""
    src = pipeline.source(data_cfg["name"], data_cfg["split"], data_cfg.get("data_dir"))
    pp = data_cfg.get("pp", "")
    if len(src) and uses_randomness(pp, src[0]):
        raise ValueError(
            f"Preprocessing {pp!r} draws random numbers, so the tower's outputs change every "
            "step and cannot be cached; set the tower's cache=False or drop the random ops."
        )
    version = str(pipeline.builder(data_cfg["name"], data_cfg.get("data_dir")).info.version)
    return {
        "dataset": data_cfg["name"],
        "split": data_cfg["split"],
        "version": version,
        "source": source_digest(src),
        "pp": pp,
        "input_key": input_key,
    }


def tower_outputs(
    apply_fn: Callable[[np.ndarray], Mapping[str, Any]],
    data_cfg: Mapping[str, Any],
    *,
    tower: Mapping[str, Any],
    outputs: tuple[str, ...] = ("pooled",),
    input_key: str = "image",
    batch_size: int = 128,
    cache: FeatureCache | None = None,
) -> dict[str, np.ndarray]:
    """Outputs of a locked tower on every example of a dataset split, computed once and cached.

    `apply_fn(inputs) -> {name: [B, ...]}` runs the tower (jitted by the caller) on a batch of
    preprocessed `input_key` fields; `data_cfg` has `name`, `split`, `pp` (deterministic) and
    optionally `data_dir`; `tower` describes the tower for the key and must hold `weights`, a
    `weights_digest`. Returns `{output: [N, ...], 'label': [N] (if the split has labels),
    'index': [N]}` in the order of the split.
    """
    description = {
        "tower": dict(tower),
        **split_description(data_cfg, input_key),
        "outputs": list(outputs),
    }

    @timing.phase("feature extraction")
    def compute() -> dict[str, np.ndarray]:
        src = pipeline.source(data_cfg["name"], data_cfg["split"], data_cfg.get("data_dir"))
        pp = data_cfg.get("pp", "")
        found: dict[str, list[np.ndarray]] = {k: [] for k in (*outputs, "label")}
        keys = (input_key, "label") if "label" in src[0] else (input_key,)
        keep = "|".join(filter(None, [pp, f"keep{keys!r}".replace(",)", ")")]))
        batches = pipeline.eval_batches({**data_cfg, "pp": keep}, batch_size=batch_size)
        label = tower.get("name", "tower")
        bar = tqdm.tqdm(
            total=len(src), desc=f"{label} on {data_cfg['name']}:{data_cfg['split']}", unit="ex"
        )

        def run(batch: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, np.ndarray]]:
            out = apply_fn(np.asarray(batch[input_key]))
            return batch, {k: np.asarray(out[k], np.float32) for k in outputs}  # waits for it

        for batch, out in in_threads(run, batches, concurrent_batches()):
            mask = np.asarray(batch["_mask"], bool)
            for k in outputs:
                found[k].append(out[k][mask])
            if "label" in batch:
                found["label"].append(np.asarray(batch["label"])[mask])
            bar.update(int(mask.sum()))
        bar.close()
        arrays = {k: np.concatenate(v) for k, v in found.items() if v}
        arrays["index"] = np.arange(len(src), dtype=np.int64)
        return arrays

    return (cache or FeatureCache()).get_or_compute(description, compute)


def concurrent_batches() -> int:
    """Batches a locked tower runs at once: one per usable core on CPU, where XLA runs one
    inference call on little more than one core (MobileNetV2 at 112 px, batch 128, on 2 cores:
    1.6x the images per second with 2); one on an accelerator."""
    return provenance.usable_cpus() if jax.default_backend() == "cpu" else 1


def in_threads(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`fn(item)` for each item, in order, at most `workers` running at once in threads (jitted
    calls release the GIL) and `workers` more results waiting, so memory stays bounded.
    Each call is the same jitted function on the same batch as a serial loop, so the outputs
    are the same bits."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # A thread pool of the standard library: what is needed is only a bounded, ordered map.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _ArraySource:
    """Random-access source over in-memory arrays (cached tower outputs and labels)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)
        self.n = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}


class _ShuffledBatches:
    """grain's `MapDataset.source(rows).shuffle(seed).repeat().batch(size, drop_remainder=True)
    [offset::stride]` as a random-access source of whole batches: the same rows in the same
    order (each epoch permuted as grain's `index_shuffle` does, seeded `seed + epoch` as its
    shuffle is, all positions at once: `data.index_shuffle`), gathered with one numpy take per
    field. Grain's row-by-row path costs tens of microseconds a row, which was most of the step
    of a run on cached features with many heads (31 streams of 256 rows a step in a zero-shot
    adaptation run). `rows` (default: all) are the rows of `fields` shuffled, read in place."""

    def __init__(self, fields: Mapping[str, np.ndarray], size: int, seed: int, offset: int,
                 stride: int, rows: np.ndarray | None = None):  # fmt: skip
        self.fields = dict(fields)
        self.rows = rows
        self.n = _row_count(fields, rows)
        self.size, self.seed, self.offset, self.stride = size, seed, offset, stride
        self._perms: dict[int, np.ndarray] = {}  # the epochs in use (grain reads from 2 threads)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return (sys.maxsize // self.size - self.offset + self.stride - 1) // self.stride

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = index_shuffle.permutation(self.n, (self.seed + epoch) % 2**32)
                if self.rows is not None:
                    perm = self.rows[perm]
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = perm
            return perm

    def rows_of(self, b: int) -> np.ndarray:
        """The rows of `fields` in batch `b`."""
        start = (self.offset + b * self.stride) * self.size
        epochs, within = np.divmod(np.arange(start, start + self.size), self.n)
        return np.concatenate(
            [self._permutation(int(e))[within[epochs == e]] for e in np.unique(epochs)]
        )

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        rows = self.rows_of(b)
        return {k: v[rows] for k, v in self.fields.items()}


class _StackedBatches:
    """Batch `b` of several `_ShuffledBatches` over the same `fields`, stacked on axis 1
    ([B, streams, ...]) by one gather per field."""

    def __init__(self, streams: Sequence[_ShuffledBatches]):
        self.streams, self.fields = list(streams), streams[0].fields

    def __len__(self) -> int:
        return len(self.streams[0])

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        rows = np.stack([s.rows_of(b) for s in self.streams], axis=1)
        return {k: v[rows] for k, v in self.fields.items()}


def _row_count(fields: Mapping[str, np.ndarray], rows: np.ndarray | None) -> int:
    """How many rows a stream over `fields` (`rows` of them, default all) shuffles."""
    return len(next(iter(fields.values()))) if rows is None else len(rows)


def _check_rows(n: int, batch_size: int, process_count: int, where: str) -> int:
    """This process's share of the batch."""
    if batch_size % process_count:
        raise UserError(
            f"batch_size={batch_size} is not divisible by the {process_count} processes."
        )
    if n < batch_size:
        raise UserError(f"{where} has {n} examples, fewer than the batch.")
    return batch_size // process_count


def train_dataset(
    fields: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    where: str,
    add: Callable[[grain.MapDataset], grain.MapDataset] | None = None,
    rows: np.ndarray | None = None,
) -> grain.MapDataset:
    """Training batches of cached features (`fields`: arrays with one row per example; `rows`
    of them, default all), shuffled with `seed` and repeated; this process's share of each
    global batch. `add` maps the shuffled examples first (e.g. drawing a caption per row);
    without it the batches are gathered whole (`_ShuffledBatches`: the same rows in the same
    order)."""
    local = _check_rows(_row_count(fields, rows), batch_size, process_count, where)
    if add is None:
        return grain.MapDataset.source(
            _ShuffledBatches(fields, local, seed, process_index, process_count, rows)
        )
    if rows is not None:
        fields = {k: v[rows] for k, v in fields.items()}
    ds = add(grain.MapDataset.source(_ArraySource(fields)).shuffle(seed=seed).repeat())
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def stacked_train_dataset(
    fields: Mapping[str, np.ndarray],
    rows: Sequence[np.ndarray | None],
    seeds: Sequence[int],
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    where: str,
) -> grain.MapDataset:
    """`train_dataset(fields, rows=rows[i], seed=seeds[i])` for every i, batch b of each
    stacked on axis 1 ([B, len(rows), ...]): a stream per head, gathered at once."""
    streams = []
    for r, seed in zip(rows, seeds, strict=True):
        local = _check_rows(_row_count(fields, r), batch_size, process_count, where)
        streams.append(_ShuffledBatches(fields, local, seed, process_index, process_count, r))
    return grain.MapDataset.source(_StackedBatches(streams))


def train_iterator(fields: Mapping[str, np.ndarray], **kwargs) -> grain.DatasetIterator:
    """Checkpointable iterator over `train_dataset(fields, **kwargs)` (in memory: one thread
    reads ahead, `pipeline.IN_MEMORY_READ`)."""
    return iter(train_dataset(fields, **kwargs).to_iter_dataset(pipeline.IN_MEMORY_READ))
