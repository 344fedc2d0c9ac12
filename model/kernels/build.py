"""Building and registering the CPU kernels: each `.cc` file here is compiled on first use and called through
`jax.ffi`.

A kernel is compiled with the host's `c++` for this machine (-march=native) against jaxlib's FFI headers, into
~/.cache/batchgen/kernels (under $BATCHGEN_CACHE when set), named by a hash of its source, the shared header, the
flags and the jaxlib version, so a machine compiles each kernel once (~10 s). Where that fails (no compiler, a
CPU a kernel has no path for: the product kernel needs AVX-512, or AVX2 with FMA), `register` logs why once and
says no: the callers then keep their pure-JAX path.
BATCHGEN_CPU_KERNELS=0 turns every kernel off the same way (to compare, or to rule a kernel out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

FOLDER = Path(__file__).parent
HEADERS = (FOLDER / "cpu_parallel.h", FOLDER / "cpu_paged_pool.h", FOLDER / "cpu_vector.h")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-shared", "-fPIC", "-std=c++17", "-w")

log = logging.getLogger(__name__)


def library_path(name: str) -> Path:
    """Where this machine's build of kernel `name` (`name.cc`) lives, whether built yet or not."""
    import jaxlib

    key = hashlib.sha256()
    for part in ((FOLDER / f"{name}.cc").read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(FLAGS),
                 jaxlib.__version__, platform.machine()):
        key.update(part if isinstance(part, bytes) else part.encode())
    # The project's cache directory, as `model.checkpoints.resolve.cache_dir` reads it (not imported from there:
    # model/kernels sits below model/checkpoints, which imports the backbone and so this package).
    cache = Path(os.environ.get("BATCHGEN_CACHE") or Path.home() / ".cache" / "batchgen")
    return cache / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"


def build(name: str, path: Path) -> None:
    """Compiles kernel `name` into `path` (written whole or not at all, so concurrent workers never load half a
    file)."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(FOLDER), str(FOLDER / f"{name}.cc"),
                   "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[:2000]}")
        os.replace(built, path)


@functools.cache
def register(name: str, symbol: str, target: str) -> bool:
    """Builds kernel `name` if needed and registers its handler `symbol` with XLA for the CPU as `target`.
    False, with the reason logged once, when it cannot be."""
    if os.environ.get("BATCHGEN_CPU_KERNELS", "1") == "0":
        log.warning("CPU kernel %s turned off by BATCHGEN_CPU_KERNELS=0, using the XLA path", name)
        return False
    try:
        path = library_path(name)
        if not path.exists():
            build(name, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        return True
    except Exception as error:  # noqa: BLE001 - any failure to build or load means: use the pure-JAX path
        log.warning("CPU kernel %s unavailable, using the XLA path: %s", name, error)
        return False
