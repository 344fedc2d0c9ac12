"""Which of a kernel's two paths a traced program takes: the CPU kernel, or the pure-JAX reference it replaces.

`jax.lax.platform_dependent(cpu=..., default=...)` lets one program run on any platform (the kernel where it
compiles for the CPU, the reference elsewhere), but it traces both branches every time. Traced for every layer of
every decode program, XLA's paged attention over the whole pool (the reference of `cpu_paged_attention`) and the
cache writes were 2/3 of a decode program's tracing: ~1.8 s per program for the demo model, more than XLA took to
compile it (~1.2 s), in every program a job compiles.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import jax.extend

T = TypeVar("T")


def cpu_only() -> bool:
    """Whether every program this process compiles runs on the CPU: the CPU is its only backend."""
    return set(jax.extend.backend.backends()) == {"cpu"}


def on_cpu(cpu: Callable[[], T], default: Callable[[], T]) -> T:
    """`cpu()` alone where the process has no backend but the CPU, else `platform_dependent`'s choice per
    platform at compile time (both traced). A program exported from a CPU-only process for another platform
    (`jax.export` with `platforms=`) would keep the CPU kernel: nothing here exports one."""
    if cpu_only():
        return cpu()
    return jax.lax.platform_dependent(cpu=cpu, default=default)
