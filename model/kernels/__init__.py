"""Hand-written kernels that XLA does not produce on its own, each with the pure-JAX path it replaces kept as the
reference and as the fallback (other platforms, no C++ compiler)."""
