"""Samplers: how the next token is chosen (per-row hot path in `sampling`, keras-hub style objects)."""
