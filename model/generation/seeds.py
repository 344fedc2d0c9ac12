"""Per-request seeds derived from a base seed, the row id and the sample index: the one seed function of
`LlamaCausalLM.generate()` (row id = the prompt's index) and of batch jobs (the job seed and the row id).

A request's seed depends on nothing else (not the shard, the worker or the batch it lands in), so a rerun,
a retried shard or a different `rows_per_shard` gives the same text for the same row. The hash is blake2b
over a JSON encoding, not Python's `hash()`, which is salted per process.
"""

from __future__ import annotations

import hashlib
import json

# The engine keeps seeds as unsigned 32-bit integers; 31 bits keep them valid as signed ones as well.
SEED_BITS = 31


def derive_seed(base_seed: int, row_id: int | str, sample_index: int) -> int:
    """The seed of sample `sample_index` of the row `row_id` in a job (or row) seeded with `base_seed`.

    Example:
        >>> derive_seed(0, "row-1", 0) == derive_seed(0, "row-1", 0) != derive_seed(0, "row-1", 1)
        True
    """
    # JSON keeps 1 and "1" apart, so an integer id and its string spelling get different seeds.
    payload = json.dumps([base_seed, row_id, sample_index]).encode()
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << SEED_BITS) - 1)
