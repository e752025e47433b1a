"""`gs://` on a local directory for tests: fsspec's `gs` filesystem, which `etils.epath` uses for
`gs://` when TensorFlow is absent, is replaced by one that maps `gs://bucket/x` to
`<buckets>/bucket/x`. Everything above fsspec runs as it would against a bucket."""

from __future__ import annotations

import importlib
import os

from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


class _WholeObject(LocalFileOpener):
    """A write that appears whole or not at all, as a GCS object does: into a temporary file,
    renamed over the object when closed (a plain local write lets a reader see it half
    written, e.g. an empty lease file while the heartbeat rewrites it)."""

    def __init__(self, path, mode, **kwargs):
        kwargs.pop("autocommit", None)
        super().__init__(path, mode, autocommit=False, **kwargs)

    def close(self):
        if not self.closed:
            self.commit()
        super().close()

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            self.close()
        else:  # an upload that failed leaves no object
            self.f.close()
            os.remove(self.temp)


class FakeGCS(LocalFileSystem):
    """fsspec's `gs` protocol on a local directory: `gs://bucket/x` is `<root>/bucket/x`."""

    protocol = ("gs", "gcs")
    root = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path) if not isinstance(path, str) else path
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix) :].rstrip("/"))
        return super()._strip_protocol(path)

    def _unstrip(self, path: str) -> str:
        """A local name under `root` as gcsfs names objects: `bucket/key`, no protocol."""
        return os.path.relpath(path, self.root) if path.startswith(self.root + "/") else path

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "w" not in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        path = self._strip_protocol(path)
        self.makedirs(self._parent(path), exist_ok=True)
        return _WholeObject(path, mode, fs=self, **kwargs)

    def glob(self, path, **kwargs):
        return [self._unstrip(p) for p in super().glob(path, **kwargs)]


def route_gs(monkeypatch, buckets) -> None:
    """Sends epath's `gs://` to `buckets` until `monkeypatch` undoes it (call `clear_caches` after
    the test so no cached filesystem outlives it)."""
    from etils.epath import gpath

    monkeypatch.setattr(FakeGCS, "root", str(buckets))
    registry = importlib.import_module("fsspec.registry")._registry
    for scheme in FakeGCS.protocol:
        monkeypatch.setitem(registry, scheme, FakeGCS)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath: fsspec, not tf.gfile
    clear_caches()


def clear_caches() -> None:
    from etils.epath import backend

    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    FakeGCS.clear_instance_cache()
