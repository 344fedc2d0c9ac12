"""fsspec access shared by the input reader and the sink: any URL fsspec knows (local, s3://, gs://, memory://)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path on it, with `storage_options` (credentials, endpoint) applied."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk, where a rename is atomic and object-store rules do not apply."""
    return isinstance(fs, LocalFileSystem)


def join(path: str, *names: str) -> str:
    """`path/name/...` with exactly one separator between parts (fsspec paths always use '/')."""
    return "/".join([path.rstrip("/"), *names])


def write_bytes_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that readers see the whole file or none of it.

    On the local disk: a temporary name beside it, then a rename. On object stores one PUT is already
    all-or-nothing, and a rename would be a copy, so the final name is written once.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    else:
        fs.pipe_file(path, data)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of `path` on `fs` (with its protocol), the same whichever way the path was spelled."""
    return fs.unstrip_protocol(path)
