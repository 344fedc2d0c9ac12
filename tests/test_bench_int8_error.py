"""The int8 logit-error measurement, on the demo model: float32 through the kernel is float32 to rounding, and
every int8 variant, quads included, moves the logits by the same amount (the weights' rounding)."""

from __future__ import annotations

import pytest

from batchgen.bench import int8_error


@pytest.mark.slow
def test_int8_variants_share_the_weight_only_logit_error():
    result = int8_error.measure(prompts=4, new_tokens=8, batch=4)
    rows = result["variants"]
    assert result["positions"] > 0
    assert rows["float32, XLA"] == {"mean": 0.0, "max": 0.0, "top1": 1.0, "kl": 0.0}
    reference = rows["int8 weights, XLA (weight-only reference)"]
    assert 0.01 < reference["mean"] < 1.0 and reference["top1"] >= 0.75
    if "float32, CPU kernel" in rows:
        assert rows["float32, CPU kernel"]["mean"] < 1e-3 * reference["mean"]  # float32 rounding only
    for name, row in rows.items():
        if name.startswith("int8"):  # widened and quads: within 5% of the weight-only error
            assert row["mean"] == pytest.approx(reference["mean"], rel=0.05), name
            assert row["top1"] >= reference["top1"] - 0.1, name
    assert "top-1 = float32's" in int8_error.render(result)
