"""A fake gs:// for tests: etils.epath's backend for gs:// paths, pointed at a local folder.

    with fake_gcs(tmp_path / "gcs"):
        epath.Path("gs://bucket/run/x.json").write_text("{}")   # tmp_path/gcs/bucket/run/x.json

As on GCS, writing a file needs no parent folder. Everything that goes through epath (orbax's step listing and commit checks included) sees the
bucket; whatever bypasses epath (open(), os.path, np.load on a path string) looks for a local
"gs:/bucket/..." relative path and fails, so a test through the fake catches such a bypass.
Not covered: TensorFlow's own gs:// filesystem (tf.io.read_file, tf.io.gfile, tf.data), nor
tensorstore's (orbax's array reads): those would try the real GCS, so tests through the fake
must not reach them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Iterator
from unittest import mock

from etils.epath import backend as backend_lib
from etils.epath import gpath

PREFIX = "gs://"


class LocalBucketBackend(backend_lib.Backend):
    """epath's Backend for gs:// paths, storing gs://BUCKET/KEY at ROOT/BUCKET/KEY."""

    def __init__(self, root: os.PathLike | str):
        self.root = os.fspath(root)
        self.local = backend_lib.os_backend

    def to_local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith(PREFIX):
            raise ValueError(f"not a gs:// path: {path}")
        return os.path.join(self.root, path[len(PREFIX):])

    def to_gs(self, local) -> str:
        return PREFIX + posixpath.normpath(os.path.relpath(os.fspath(local), self.root))

    def open(self, path, mode):
        local = self.to_local(path)
        if "w" in mode or "a" in mode:  # GCS has no folders: a write needs no parent
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return self.local.open(local, mode)

    def exists(self, path) -> bool:
        return self.local.exists(self.to_local(path))

    def isdir(self, path) -> bool:
        return self.local.isdir(self.to_local(path))

    def listdir(self, path) -> list[str]:
        return self.local.listdir(self.to_local(path))

    def glob(self, path) -> list[str]:
        return [self.to_gs(p) for p in self.local.glob(self.to_local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.local.walk(self.to_local(top), top_down=top_down,
                                                 on_error=on_error):
            yield self.to_gs(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.local.makedirs(self.to_local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self.local.mkdir(self.to_local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path) -> None:
        self.local.rmtree(self.to_local(path))

    def remove(self, path) -> None:
        self.local.remove(self.to_local(path))

    def rename(self, path, dst) -> None:
        self.local.rename(self.to_local(path), self.to_local(dst))

    def replace(self, path, dst) -> None:
        self.local.replace(self.to_local(path), self.to_local(dst))

    def copy(self, path, dst, overwrite: bool) -> None:
        self.local.copy(self.to_local(path), self.to_local(dst), overwrite=overwrite)

    def stat(self, path):
        return self.local.stat(self.to_local(path))


@contextlib.contextmanager
def fake_gcs(root: os.PathLike | str) -> Iterator[LocalBucketBackend]:
    """Within the block, epath.Path("gs://...") reads and writes under `root`."""
    backend = LocalBucketBackend(root)
    os.makedirs(backend.root, exist_ok=True)
    # epath picks TensorFlow's gfile for gs:// whenever TF is installed: turn that off too.
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": backend}), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False):
        yield backend
