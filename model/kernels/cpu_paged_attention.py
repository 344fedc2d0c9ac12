"""The CPU decode-attention kernel (`cpu_paged_attention.cc`): built on first use, called through `jax.ffi`.

Why a kernel: on CPU, XLA runs decode attention's small per-page products as batched dots on one core, ~30% of
a 64-slot decode step of the demo model, and reads every page below the highest one in use, so a step of a few
rows in a mostly empty pool still reads it all. The kernel walks each slot's own pages and spreads the slots
over XLA's intra-op threads (see the .cc file). `model.paged_attention.decode_attention` stays the reference
and runs wherever this cannot: other platforms (`jax.lax.platform_dependent` picks per platform at compile
time), pools that are not float32, a pool split across devices, or a machine without a C++ compiler.

The library is compiled with the host's `c++` for this machine (-march=native) against jaxlib's FFI headers,
into ~/.cache/batchgen/kernels (under $BATCHGEN_CACHE when set), named by a hash of the source, the flags and the jaxlib
version, so a machine compiles it once (~10 s).
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
from typing import Sequence

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("cpu_paged_attention.cc")
TARGET = "batchgen_paged_attention"
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-shared", "-fPIC", "-std=c++17", "-w")

log = logging.getLogger(__name__)


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS), jaxlib.__version__, platform.machine()):
        key.update(part if isinstance(part, bytes) else part.encode())
    # The project's cache directory, as `model.checkpoints.resolve.cache_dir` reads it (not imported from there:
    # model/kernels sits below model/checkpoints, which imports the backbone and so this module).
    cache = Path(os.environ.get("BATCHGEN_CACHE") or Path.home() / ".cache" / "batchgen")
    return cache / "kernels" / f"cpu_paged_attention-{key.hexdigest()[:16]}.so"


def build(path: Path) -> None:
    """Compiles the kernel into `path` (written whole or not at all, so concurrent workers never load half a file)."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, path)


def supports(q: jax.Array, chunks_k: Sequence[jax.Array]) -> bool:
    """Whether the library has an instantiation for these shapes and types (`Select` in the .cc file): float32
    pools of 32-position pages, head size 64 or 128, 1 to 8 query heads per KV head."""
    (_, _, h, d), (_, k_heads, _, page) = q.shape, chunks_k[0].shape
    return chunks_k[0].dtype == jnp.float32 and page == 32 and d in (64, 128) and 1 <= h // k_heads <= 8


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: the engine then uses the pure-JAX attention."""
    try:
        path = library_path()
        if not path.exists():
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        handler = jax.ffi.pycapsule(library.BatchgenPagedAttention)
        jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
        return True
    except Exception as error:  # noqa: BLE001 - any failure to build or load means: use the pure-JAX path
        log.warning("CPU paged-attention kernel unavailable, using the XLA path: %s", error)
        return False


def decode_attention(q: jax.Array, chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], view) -> jax.Array:
    """`model.paged_attention.decode_attention` computed by the kernel: q [B, 1, H, D] -> [B, 1, H, D]. The pool
    chunks must be float32; view.owner and view.start are not needed (a slot's row of the page table lists its
    pages in position order)."""
    b, _, h, d = q.shape
    k_heads = chunks_k[0].shape[1]
    qg = (q[:, 0].astype(jnp.float32) * d**-0.5).reshape(b, k_heads, h // k_heads, d)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(qg.shape, jnp.float32))
    out = call(qg, view.lengths.astype(jnp.int32), view.table.astype(jnp.int32), *chunks_k, *chunks_v)
    return out.reshape(b, 1, h, d).astype(q.dtype)
