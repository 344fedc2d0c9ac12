"""The peers `batchgen bench --peers` measures beside our engine, and whether an interpreter can run them.

Each peer is a standalone script in this folder, run as a child process by an interpreter that has its packages
(`--peer-python`; torch, transformers and keras-hub are not batchgen dependencies). A peer whose packages the
interpreter lacks is reported as skipped with the reason, never estimated.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Peer:
    """A system to compare against: its script, the modules it imports, and what to install for it."""

    system: str
    script: Path
    modules: tuple[str, ...]
    install: str


TRANSFORMERS = Peer(
    "transformers", HERE / "transformers_generate.py", ("torch", "transformers", "gguf"),
    "pip install torch==2.13.0 transformers gguf",
)
KERAS_HUB = Peer(
    "keras-hub", HERE / "keras_hub_generate.py", ("keras_hub", "keras", "jax"), "pip install keras-hub jax"
)
PEERS: tuple[Peer, ...] = (TRANSFORMERS, KERAS_HUB)

_CHECK = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"


def unavailable_reason(peer: Peer, python: str, timeout: float = 120.0) -> str | None:
    """Why `python` cannot run `peer` (a missing interpreter or modules), or None when it can."""
    if not Path(python).exists():
        return f"interpreter {python} does not exist (pass --peer-python)"
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
        return f"{python} lacks {', '.join(missing)} ({peer.install})"
    return None
