"""Which path a traced program takes, the CPU kernel or its reference (model/kernels/platform.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import platform


def traced_branches(monkeypatch, cpu_only: bool) -> tuple[list[str], jax.Array]:
    """The branches that tracing `on_cpu` ran, and the program's result on this (CPU) machine."""
    monkeypatch.setattr(platform, "cpu_only", lambda: cpu_only)
    traced = []

    def branch(name: str, value: float):
        def run():
            traced.append(name)
            return jnp.full((3,), value, jnp.float32)
        return run

    out = jax.jit(lambda: platform.on_cpu(branch("cpu", 1.0), branch("default", 2.0)))()
    return traced, out


def test_a_cpu_only_process_traces_the_kernel_alone(monkeypatch):
    traced, out = traced_branches(monkeypatch, cpu_only=True)
    assert traced == ["cpu"]  # the reference (XLA's attention over the pool, per layer) is never traced
    np.testing.assert_array_equal(out, np.ones(3))


def test_a_process_with_other_backends_keeps_both_and_runs_the_cpus_here(monkeypatch):
    traced, out = traced_branches(monkeypatch, cpu_only=False)
    assert sorted(traced) == ["cpu", "default"]  # platform_dependent: one per platform at compile time
    np.testing.assert_array_equal(out, np.ones(3))  # compiled for this machine's CPU


def test_this_test_machine_is_cpu_only():
    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator is attached")
    assert platform.cpu_only()
