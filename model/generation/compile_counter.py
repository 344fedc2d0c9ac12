"""Counts XLA compilations, so that "no recompiles in a long job" is measured, not assumed."""

from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_compiles = 0
_compile_seconds = 0.0


def _on_event(event: str, duration_secs: float, **_: object) -> None:
    global _compiles, _compile_seconds
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _compiles += 1
            _compile_seconds += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_event)


def snapshot() -> tuple[int, float]:
    """(programs compiled so far in this process, seconds spent compiling them)."""
    with _lock:
        return _compiles, _compile_seconds
