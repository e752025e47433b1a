"""Grain input pipelines over `tfds.data_source`: deterministic, per-process, checkpointable.

Training: seeded shuffle (reshuffled every epoch) -> repeat -> preprocess (random ops get a
per-example generator derived from the seed) -> batch -> this process's part of each global batch,
so the global stream does not depend on the number of processes. The iterator's state is a small
JSON blob that Orbax saves beside the train state (`grain.checkpoint`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from xmodal_jax import timing
from xmodal_jax.data import builders, preprocess
from xmodal_jax.errors import UserError

Batch = dict[str, np.ndarray]


def data_dir(path: str | None = None) -> str:
    """Where TFDS datasets live: argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(
        path or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    )


def _base_name(name: str) -> str:
    """`name` without its config and version: `digits_mnist_c/fog_3:1.0.0` -> `digits_mnist_c`."""
    return name.split(":")[0].split("/")[0]


def _check_config(name: str) -> None:
    """An unknown config of an embedded dataset is one error with the closest configs."""
    base, _, config = name.split(":")[0].partition("/")
    if not config or base not in builders.EMBEDDED:
        return
    configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
    if config not in configs:
        close = difflib.get_close_matches(config, configs, n=3, cutoff=0.5)
        raise UserError(
            f"Dataset {base!r} has no config {config!r}; closest: {close} (of its "
            f"{len(configs)} configs, e.g. {configs[:3]})."
            if configs
            else f"Dataset {base!r} has no configs; name it {base!r}."
        )


def builder(name: str, path: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name`; one clear error with the closest names if it is unknown."""
    _check_config(name)
    try:
        return tfds.builder(name, data_dir=data_dir(path))
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted(
            set(tfds.list_builders(with_community_datasets=False)) | set(builders.EMBEDDED)
        )
        close = difflib.get_close_matches(_base_name(name), known, n=3)
        raise UserError(
            f"Unknown dataset {name!r}; closest TFDS names: {close}. The embedded ones are "
            f"{list(builders.EMBEDDED)}."
        ) from None


def source(name: str, split: str, path: str | None = None):
    """Random-access source of one split, preparing embedded datasets on first use."""
    b = builder(name, path)
    if _base_name(name) in builders.EMBEDDED:
        try:
            with timing.phase("data build"):
                b.download_and_prepare()
        except FileExistsError:  # another process of a multi-process job finished it first
            b = builder(name, path)
        except OSError as e:  # the data dir is read-only, under a file, full, ...
            if isinstance(e, FileNotFoundError) and e.filename is None:
                # not a path of the data dir: assets.py's missing package, with its pip line
                raise UserError(f"Cannot prepare dataset {name!r}: {e}") from None
            raise UserError(
                f"Cannot prepare dataset {name!r} in {data_dir(path)} ({e.strerror or e}); set "
                "TFDS_DATA_DIR to a directory this user can write."
            ) from None
    known = list(b.info.splits)  # empty for catalogue datasets that are not prepared (or mocked)
    if not known and getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise UserError(
            f"Dataset {name!r} is not prepared in {b.data_dir}.\n{b.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    if known and split.split("[")[0] not in known:
        raise UserError(f"Dataset {name!r} has no split {split!r}; it has {sorted(known)}.")
    try:
        return b.as_data_source(split=split)
    except NotImplementedError:
        raise UserError(
            f"Dataset {name!r} is not prepared as ArrayRecord in {b.data_dir}; prepare it with "
            f"`tfds build {name} --file_format=array_record --data_dir={data_dir(path)}` "
            "(needs the `tf` extra for most catalogue datasets)."
        ) from None


# Splits whose decoded records fit in this many bytes are held in memory by default.
MEMORY_CACHE_BYTES = 256 * 2**20


def _nbytes(value: Any) -> int:
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    return np.asarray(value).nbytes


def records(cfg: Mapping[str, Any]) -> Sequence:
    """Random-access records of `cfg`'s split, decoded once and held in memory when `cfg.cache`
    is True, or when it is 'auto' (the default) and they fit in `MEMORY_CACHE_BYTES`.

    Decoding a TFDS record is most of the input cost of small images (digits: about two thirds
    of a training batch's), so small splits are decoded once; the records and their order are
    the same either way.
    """
    src = source(cfg["name"], cfg["split"], cfg.get("data_dir"))
    cache = cfg.get("cache", "auto")
    if cache not in (True, False, "auto"):
        raise UserError(f"data cache={cache!r}: use True, False or 'auto'.")
    size = len(src) * _nbytes(src[0]) if len(src) else 0
    if cache == "auto":
        cache = size <= MEMORY_CACHE_BYTES
    if not cache or not len(src):
        return src
    # grain's CacheIterDataset caches one pass of an iterator (its order), so it cannot sit
    # below a shuffle; a random-access source needs the decoded records themselves.
    key = _split_key(cfg, src)
    if key not in _DECODED:
        while _DECODED and sum(n for n, _ in _DECODED.values()) + size > DECODED_BYTES:
            _DECODED.pop(next(iter(_DECODED)))  # the oldest split goes first
        _DECODED[key] = (size, tuple(_read_only(src[i]) for i in range(len(src))))
    return _DECODED[key][1]


# Decoded splits (their size in bytes and records), once per process: a resumed iterator, a
# second task on the same split and every evaluation of a run read them, keyed by what
# identifies their content, within DECODED_BYTES in all.
_DECODED: dict[tuple, tuple[int, tuple]] = {}
DECODED_BYTES = 4 * MEMORY_CACHE_BYTES


def _split_key(cfg: Mapping[str, Any], src: Sequence) -> tuple:
    """What identifies a split's content: its name, split, data directory and fingerprint."""
    return (cfg["name"], cfg["split"], data_dir(cfg.get("data_dir")), _fingerprint(src))


def _fingerprint(src: Sequence) -> str:
    """The size and a digest of the first and last record of a source."""
    h = hashlib.sha256(str(len(src)).encode())

    def update(value: Any) -> None:
        if isinstance(value, Mapping):
            for k in sorted(value):
                h.update(str(k).encode())
                update(value[k])
        else:
            h.update(np.ascontiguousarray(value).tobytes())

    for i in sorted({0, len(src) - 1}):
        update(src[i])
    return h.hexdigest()


def _read_only(value: Any) -> Any:
    """A record whose arrays cannot be written: every reader of the process shares it."""
    if isinstance(value, Mapping):
        return {k: _read_only(v) for k, v in value.items()}
    value = np.array(value)  # a copy: the source's own buffers stay as they were
    value.flags.writeable = False
    return value


def class_names(name: str, path: str | None = None, key: str = "label") -> list[str]:
    """ClassLabel names of a dataset's label feature."""
    return list(builder(name, path).info.features[key].names)


@functools.lru_cache(maxsize=8)
def _split_labels(name: str, split: str, path: str) -> np.ndarray:
    src = source(name, split, path)
    labels = np.array([int(src[i]["label"]) for i in range(len(src))], np.int64)
    labels.flags.writeable = False
    return labels


def split_labels(name: str, split: str, path: str | None = None) -> np.ndarray:
    """The integer labels of every row of a split (read once per process; read-only)."""
    return _split_labels(name, split, data_dir(path))


def _check_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise UserError(
            f"batch_size={batch_size} is not divisible by the {process_count} processes; "
            "set a multiple of the process count."
        )
    return batch_size // process_count


class _Rows:
    """Random-access view of the rows `indices` of a source."""

    def __init__(self, src: Sequence, indices: Sequence[int]):
        self.src, self.indices = src, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.src[int(self.indices[i])]


def train_dataset(
    cfg: Mapping[str, Any],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    indices: Sequence[int] | None = None,
) -> grain.MapDataset:
    """Infinite, shuffled, preprocessed MapDataset of this process's rows of each global batch.

    `cfg` has `name`, `split`, `pp` (spec string) and optionally `data_dir` and `cache`
    (`records`). `indices` restricts training to those rows of the split (a labelled subset).
    """
    local = _check_batch(batch_size, process_count)
    src = records(cfg)
    ds = grain.MapDataset.source(src if indices is None else _Rows(src, indices))
    if len(ds) < batch_size:
        raise UserError(
            f"{cfg['name']}:{cfg['split']} has {len(ds)} examples, fewer than the batch "
            f"{batch_size}; lower batch_size."
        )
    pp = preprocess.compose(cfg.get("pp", ""))
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(lambda ex, rng: pp(ex, rng), seed=seed + 1)
    # Global batch g is local batches g*P ... g*P+P-1; process p takes the p-th of them. Only
    # those rows are read and preprocessed here (MapDataset is lazy).
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


# Grain's default read-ahead (16 threads, 500 elements) is for records read from files; over
# records held in memory its threads only contend for the GIL (grain's `ReadOptions` docs): a
# paired digits batch (64 MNIST + 64 SynDigits-like) took 21 ms with it, 7 ms with one thread.
IN_MEMORY_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def read_options(*cfgs: Mapping[str, Any]) -> grain.ReadOptions | None:
    """`IN_MEMORY_READ` when every split of `cfgs` is held in memory (`records`), else None
    (Grain's default)."""
    return IN_MEMORY_READ if all(isinstance(records(c), tuple) for c in cfgs) else None


def train_iterator(cfg: Mapping[str, Any], **kwargs) -> grain.DatasetIterator:
    """Checkpointable iterator over `train_dataset(cfg, **kwargs)`."""
    return iter(train_dataset(cfg, **kwargs).to_iter_dataset(read_options(cfg)))


def paired_iterator(
    source_cfg: Mapping[str, Any], target_cfg: Mapping[str, Any], *, seed: int, **kwargs
) -> grain.DatasetIterator:
    """Yields `{'source': batch, 'target': batch}` for domain adaptation; one state for both."""
    src = train_dataset(source_cfg, seed=seed, **kwargs)
    tgt = train_dataset(target_cfg, seed=seed + 7919, **kwargs)
    zipped = grain.experimental.ZipMapDataset(parents=[src, tgt])
    read = read_options(source_cfg, target_cfg)
    return iter(zipped.map(lambda st: {"source": st[0], "target": st[1]}).to_iter_dataset(read))


def row_batches(
    cfg: Mapping[str, Any], rows: np.ndarray, key: str, batch_size: int
) -> Iterator[np.ndarray]:
    """Field `key` of split `cfg` (`name`, `split`, `pp`, `data_dir`) at `rows`, in that order,
    preprocessed, stacked in batches of `batch_size` (the last one short)."""
    src = records(cfg)  # decoded once per process when small: e.g. read again for every head
    pp = preprocess.compose(cfg.get("pp", ""))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield np.stack([np.asarray(pp(dict(src[int(i)]))[key]) for i in chunk])


def eval_data(
    cfg: Mapping[str, Any], where: str, default: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The data config `{name, split, pp, data_dir}` of an evaluation block `cfg` (its keys
    `dataset`, `split` (default 'test'), `pp`, `data_dir`); what `cfg` lacks comes from
    `default` (a task's training data) when given. No dataset at all is one error naming
    `where`."""
    default = default or {}
    name = cfg.get("dataset", default.get("name"))
    if name is None:
        raise UserError(f"{where} has no 'dataset'; set the TFDS name to use.")
    return {
        "name": name,
        "split": cfg.get("split", "test"),
        "pp": cfg.get("pp", default.get("pp", "")),
        "data_dir": cfg.get("data_dir", default.get("data_dir")),
    }


def eval_batches(
    cfg: Mapping[str, Any],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """One pass over this process's shard, in order, every batch padded to `batch_size // P`.

    Padding rows have `_mask == False`, so metrics count each real example exactly once. Every
    process yields the same number of batches (collectives must match), even when its shard is
    one example shorter than another's.
    """
    local = _check_batch(batch_size, process_count)
    src = records(cfg)  # decoded once per process when small: a run evaluates many times
    key = None
    if isinstance(src, tuple):  # a decoded split: its preprocessed batches may be kept too
        key = (_split_key(cfg, src), cfg.get("pp", ""), local, process_index, process_count)
        if key in _EVAL_BATCHES:
            yield from (dict(b) for b in _EVAL_BATCHES[key][1])
            return
    ds = grain.MapDataset.source(src)[process_index::process_count]
    pp = preprocess.compose(cfg.get("pp", ""))
    ds = ds.map(lambda ex: {**pp(ex), "_mask": np.True_})
    n, longest = len(ds), -(-len(src) // process_count)
    kept, size = [], 0
    for start in range(0, longest, local):
        rows = [ds[i] for i in range(start, min(start + local, n))]
        filler = rows[0] if rows else {**pp(src[0]), "_mask": np.True_}
        while len(rows) < local:
            rows.append({**filler, "_mask": np.False_})
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if key is not None:
            size += _nbytes(batch)
            if size > EVAL_BATCHES_BYTES:  # too big to keep: stop holding this pass
                key, kept = None, []
            else:
                for array in batch.values():  # stacked here: shared read-only, not copied
                    array.flags.writeable = False
                kept.append(batch)
                batch = dict(batch)
        yield batch
    if key is not None:
        while _EVAL_BATCHES and sum(b for b, _ in _EVAL_BATCHES.values()) + size > (
            EVAL_BATCHES_BYTES
        ):
            _EVAL_BATCHES.pop(next(iter(_EVAL_BATCHES)))  # the oldest pass goes first
        _EVAL_BATCHES[key] = (size, tuple(kept))


# One pass of preprocessed evaluation batches per decoded split, pp spec and shard, once per
# process within EVAL_BATCHES_BYTES in all: a run evaluates the same splits every `eval_every`
# steps, and the per-example preprocessing of a pass (digits RGB: ~2 s of a pass on 2 cores) is
# the same each time (evaluation preprocessing draws from a fixed seed per example).
_EVAL_BATCHES: dict[tuple, tuple[int, tuple[Batch, ...]]] = {}
EVAL_BATCHES_BYTES = 4 * MEMORY_CACHE_BYTES
