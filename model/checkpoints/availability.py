"""Whether a preset can load here, found the way `load_preset` would resolve it, without loading any weights.

`batchgen validate` asks this before a job starts (so a preset that cannot load fails in a second, not three
worker starts later) and `batchgen presets` shows it for each built-in preset. The order is the loader's: a
built-in name (its Kaggle handle, or the pip-installed demo GGUF), `kaggle://` and `hf://` handles (the
package, then the local cache, then whether the hub answers), then any local path or fsspec URL (it exists, and
is a GGUF file or a directory with config.json or one .gguf file).

Example:
    >>> check_preset("llama3_8b_en").problem  # doctest: +SKIP
    'kaggle://keras/llama3/keras/llama3_8b_en/5 needs the kagglehub package, which is not installed: ...'
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import posixpath
import socket

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model.checkpoints import presets

HUB_HOSTS = {"kaggle://": "www.kaggle.com", "hf://": "huggingface.co"}
GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class PresetAvailability:
    """Where a preset comes from and whether it loads here.

    `offline`: it loads without network access (installed, cached, or a local file). `problem`: why it cannot
    load here, or None when it can (perhaps after a download, when `offline` is False).
    """

    preset: str
    source: str
    offline: bool
    problem: str | None = None


def check_preset(preset: str | os.PathLike[str], *, probe_network: bool = True, timeout: float = 3.0) -> PresetAvailability:
    """How `preset` would load here; `probe_network=False` reports a hub preset that is not cached as not
    offline without asking the hub (for listings, which should not wait on the network)."""
    name = os.fspath(preset)
    builtin = presets.BUILTIN_PRESETS.get(name)
    if builtin is not None:
        if builtin.handle.startswith("distribution:"):
            distribution = builtin.handle.removeprefix("distribution:")
            try:
                path = presets.installed_gguf(distribution)
            except FileNotFoundError as error:
                return PresetAvailability(name, f"pip package {distribution}", False, str(error))
            return PresetAvailability(name, f"pip package {distribution} ({path})", True)
        found = check_preset(builtin.handle, probe_network=probe_network, timeout=timeout)
        return dataclasses.replace(found, preset=name)
    for scheme, host in HUB_HOSTS.items():
        if name.startswith(scheme):
            return _check_hub(name, scheme, host, probe_network, timeout)
    return _check_location(name)


def _check_hub(handle: str, scheme: str, host: str, probe_network: bool, timeout: float) -> PresetAvailability:
    package = "kagglehub" if scheme == "kaggle://" else "huggingface_hub"
    if importlib.util.find_spec(package) is None:
        return PresetAvailability(
            handle, handle, False,
            f"{handle} needs the {package} package, which is not installed: pip install {package} (or pip install "
            "'batchgen[hub]'); or download the checkpoint elsewhere and pass its local path",
        )
    cached = _kaggle_cache(handle) if scheme == "kaggle://" else _huggingface_cache(handle)
    if cached is not None:
        return PresetAvailability(handle, f"{handle} (cached in {cached})", True)
    if scheme == "hf://" and os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return PresetAvailability(handle, handle, False, f"{handle} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if probe_network and not _reachable(host, timeout):
        return PresetAvailability(
            handle, handle, False,
            f"{handle} is not in the {package} cache and {host} cannot be reached (no network?); download the "
            "checkpoint on a connected machine and pass its local path (or an s3:// / gs:// URL) instead",
        )
    return PresetAvailability(handle, handle, False)


def _kaggle_cache(handle: str) -> str | None:
    """kagglehub's cache directory of `kaggle://owner/model/framework/variation/version`, when it holds files;
    a handle without a version resolves the latest version online, so it is never taken as cached."""
    parts = handle.removeprefix("kaggle://").strip("/").split("/")
    if len(parts) != 5:
        return None
    root = os.environ.get("KAGGLEHUB_CACHE") or pathlib.Path.home() / ".cache" / "kagglehub"
    directory = pathlib.Path(root, "models", *parts)
    return str(directory) if directory.is_dir() and any(directory.iterdir()) else None


def _huggingface_cache(handle: str) -> str | None:
    """A snapshot of `hf://owner/name` in the Hugging Face cache, when there is one."""
    repo = handle.removeprefix("hf://").strip("/").split("@", 1)[0]
    home = os.environ.get("HF_HOME") or pathlib.Path.home() / ".cache" / "huggingface"
    root = os.environ.get("HF_HUB_CACHE") or pathlib.Path(home, "hub")
    snapshots = pathlib.Path(root, "models--" + repo.replace("/", "--"), "snapshots")
    found = [s for s in snapshots.iterdir() if any(s.iterdir())] if snapshots.is_dir() else []
    return str(found[0]) if found else None


def _reachable(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, timed out: all mean the download would fail
        return False


def _check_location(name: str) -> PresetAvailability:
    try:
        fs, path = fsspec.core.url_to_fs(name)
        exists = fs.exists(path)
    except Exception as error:  # an unknown protocol, missing credentials, an unreachable store
        return PresetAvailability(name, name, False, f"{name} cannot be reached: {type(error).__name__}: {error}")
    local = isinstance(fs, LocalFileSystem)
    if not exists:
        hint = ""
        if "/" not in name and "\\" not in name and not name.endswith(".gguf"):
            hint = f"; built-in presets: {', '.join(presets.BUILTIN_PRESETS)}"
        return PresetAvailability(name, name, local, f"{name}: no such file or directory{hint}")
    if fs.isfile(path):
        with fs.open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return PresetAvailability(name, name, local, f"{name} is a file but not a GGUF file")
        return PresetAvailability(name, name, local)
    entries = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    if "config.json" in entries or sum(e.endswith(".gguf") for e in entries) == 1:
        return PresetAvailability(name, name, local)
    return PresetAvailability(
        name, name, local,
        f"{name} is not a checkpoint batchgen can read: no config.json (keras-hub preset or Hugging Face "
        f"directory) and not exactly one .gguf file; it holds {sorted(entries)[:10]}",
    )
