"""Reading and writing tokenizer files at a local path or any fsspec URL (file://, memory://, s3://, gs://)."""

from __future__ import annotations

import os

import fsspec


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole content of the file at `location`; FileNotFoundError naming it when it is not there."""
    location = os.fspath(location)
    try:
        with fsspec.open(location, "rb") as file:
            return file.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"tokenizer file not found: {location}") from e


def read_text(location: str | os.PathLike[str]) -> str:
    """The content of the UTF-8 text file at `location`."""
    data = read_bytes(location)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer file {os.fspath(location)} is not UTF-8 text: {e}") from e


def exists(location: str | os.PathLike[str]) -> bool:
    """Whether a file exists at `location`."""
    filesystem, path = fsspec.core.url_to_fs(os.fspath(location))
    return filesystem.isfile(path)


def join(directory: str | os.PathLike[str], name: str) -> str:
    """`directory/name` for a local path or a URL (os.path.join would use backslashes on Windows URLs)."""
    return os.fspath(directory).rstrip("/") + "/" + name


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `location`, creating parent folders of a local path."""
    location = os.fspath(location)
    filesystem, path = fsspec.core.url_to_fs(location)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        filesystem.makedirs(parent, exist_ok=True)
    with filesystem.open(path, "wb") as file:
        file.write(data)
