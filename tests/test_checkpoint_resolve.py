"""Preset arguments to (filesystem, path): local paths, fsspec URLs, hub handles without network, the file cache."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from model.checkpoints.resolve import download_huggingface, download_kaggle, local_file, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_local_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = resolve("models/tiny")
    assert isinstance(relative.fs, LocalFileSystem)
    assert relative.path == str(tmp_path / "models" / "tiny") and relative.url == relative.path
    url = resolve((tmp_path / "x.gguf").as_uri())
    assert isinstance(url.fs, LocalFileSystem) and url.path == str(tmp_path / "x.gguf")
    assert resolve(tmp_path).path == str(tmp_path)  # os.PathLike too


def test_memory_url():
    resolved = resolve("memory://models/tiny")
    assert isinstance(resolved.fs, MemoryFileSystem)
    assert (resolved.path, resolved.url, resolved.source) == ("/models/tiny", "memory:///models/tiny", "memory://models/tiny")


def test_huggingface_handle_offline_fails_fast_with_advice(tmp_path):
    """A real huggingface_hub call with HF_HUB_OFFLINE=1 (read when the hub is imported, hence a subprocess)."""
    pytest.importorskip("huggingface_hub")
    script = "from model.checkpoints.resolve import resolve\nresolve('hf://batchgen-tests/no-such-model')"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: could not download hf://batchgen-tests/no-such-model with huggingface_hub")
    assert "HF_HUB_OFFLINE is set" in last and "pass its local path" in last


@pytest.mark.skipif(importlib.util.find_spec("kagglehub") is not None, reason="kagglehub is installed here")
def test_kaggle_handle_without_kagglehub_names_the_package():
    with pytest.raises(ImportError, match=r"kaggle://keras/llama3/keras/llama3_8b_en/5 needs the kagglehub package"):
        resolve("kaggle://keras/llama3/keras/llama3_8b_en/5")


@pytest.mark.parametrize("handle", ["hf://just-a-name", "hf://a/b/c"])
def test_malformed_huggingface_handles(handle):
    with pytest.raises(ValueError, match="is not a Hugging Face handle; expected hf://owner/name"):
        download_huggingface(handle)


def test_malformed_kaggle_handle():
    with pytest.raises(ValueError, match="expected kaggle://owner/model/framework/variation"):
        download_kaggle("kaggle://keras/llama3")


def test_remote_file_is_cached_once_and_refetched_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.pipe("/cache-test/model.gguf", b"GGUF first")
    try:
        first = local_file(memory, "/cache-test/model.gguf")
        assert first.startswith(str(tmp_path / "cache")) and first.endswith("model.gguf")
        assert pathlib.Path(first).read_bytes() == b"GGUF first"
        assert local_file(memory, "/cache-test/model.gguf") == first
        memory.pipe("/cache-test/model.gguf", b"GGUF second version")
        second = local_file(memory, "/cache-test/model.gguf")
        assert second != first and pathlib.Path(second).read_bytes() == b"GGUF second version"
        assert not list((tmp_path / "cache").rglob("*.partial-*"))
    finally:
        memory.rm("/cache-test", recursive=True)


def test_local_file_is_used_in_place(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert local_file(fsspec.filesystem("file"), str(path)) == str(path)
