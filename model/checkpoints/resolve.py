"""Turning a preset argument into a filesystem and a path: local paths, fsspec URLs and hub handles.

- a local path, `file://...`, or any fsspec URL (`memory://`, `s3://`, `gs://`, ...) is read where it is;
- `hf://owner/name` is downloaded with `huggingface_hub.snapshot_download` and `kaggle://owner/model/framework/
  variation[/version]` with `kagglehub.model_download`, when those packages are installed (`batchgen[hub]`) and the
  network allows; otherwise the error says which package is missing, or that the hub could not be reached, and
  suggests downloading elsewhere and passing the local directory.

Readers that need a real file (GGUF is memory-mapped) call `local_file`, which copies a remote file into a cache
directory once (`$BATCHGEN_CACHE`, default `~/.cache/batchgen`), keyed by the file's URL and fsspec's unique key
(size and modification time or etag), so a changed remote file is fetched again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import pathlib
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem

HUB_SCHEMES = ("hf://", "kaggle://")


@dataclasses.dataclass(frozen=True)
class ResolvedPreset:
    """Where a preset's files are: `path` on `fs`; `source` is the argument as given, for messages."""

    fs: fsspec.AbstractFileSystem
    path: str
    source: str

    @property
    def url(self) -> str:
        return display(self.fs, self.path)


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a user would write it: plain for local files, a URL otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def resolve(preset: str | os.PathLike[str]) -> ResolvedPreset:
    """The filesystem and path of a preset argument; hub handles are downloaded first.

    Does not check that the path exists; the loader does, with the preset named in its error.

    Example:
        >>> resolve("memory://models/tiny").path
        '/models/tiny'
    """
    source = os.fspath(preset)
    if source.startswith("hf://"):
        return ResolvedPreset(LocalFileSystem(), download_huggingface(source), source)
    if source.startswith("kaggle://"):
        return ResolvedPreset(LocalFileSystem(), download_kaggle(source), source)
    fs, path = fsspec.core.url_to_fs(source)
    return ResolvedPreset(fs, path, source)


def download_huggingface(handle: str) -> str:
    """Downloads `hf://owner/name[@revision]` and returns the local snapshot directory."""
    repo = handle.removeprefix("hf://").strip("/")
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if repo.count("/") != 1:
        raise ValueError(f"{handle!r} is not a Hugging Face handle; expected hf://owner/name")
    hub = _import_hub("huggingface_hub", handle)
    try:
        return hub.snapshot_download(repo_id=repo, revision=revision)
    except Exception as e:  # the hub raises many types (offline, HTTP, DNS); all mean: not downloaded
        raise _download_error(handle, "huggingface_hub", e) from e


def download_kaggle(handle: str) -> str:
    """Downloads `kaggle://owner/model/framework/variation[/version]` and returns the local directory."""
    parts = handle.removeprefix("kaggle://").strip("/").split("/")
    if len(parts) not in (4, 5):
        raise ValueError(f"{handle!r} is not a Kaggle Models handle; expected kaggle://owner/model/framework/variation")
    kagglehub = _import_hub("kagglehub", handle)
    try:
        return kagglehub.model_download("/".join(parts))
    except Exception as e:  # kagglehub raises its own and requests' errors; all mean: not downloaded
        raise _download_error(handle, "kagglehub", e) from e


def _import_hub(package: str, handle: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"loading {handle} needs the {package} package, which is not installed: pip install {package} "
            f"(or pip install 'batchgen[hub]'); or download the checkpoint elsewhere and pass its local path"
        ) from e


def _download_error(handle: str, package: str, error: Exception) -> ConnectionError:
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") and package == "huggingface_hub"
    why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable or refused the request"
    return ConnectionError(
        f"could not download {handle} with {package} ({why}: {type(error).__name__}: {error}). "
        "Without network access, download the checkpoint on a connected machine and pass its local path "
        "(or an s3:// / gs:// URL) instead."
    )


def cache_dir() -> pathlib.Path:
    """Where remote files are copied for readers that need a local file."""
    return pathlib.Path(os.environ.get("BATCHGEN_CACHE") or pathlib.Path.home() / ".cache" / "batchgen")


def local_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A local path holding the file `path` of `fs`: the file itself when local, else a cached copy."""
    if isinstance(fs, LocalFileSystem):
        return path
    url = fs.unstrip_protocol(path)
    key = hashlib.sha256(f"{url}\n{fs.ukey(path)}".encode()).hexdigest()[:16]
    target = cache_dir() / "files" / key / posixpath.basename(path)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        fs.get_file(path, str(partial))
        os.replace(partial, target)  # atomic: a concurrent reader never sees half a file
    finally:
        partial.unlink(missing_ok=True)
    return str(target)
