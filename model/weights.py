"""The weight tree of a Llama config: every weight's name and shape, and which ones int8 quantizes along which axes.

Kept apart from the backbone so that the tensor-parallel layout (`model.parallel`), which the backbone uses, and
the checkpoint readers can name weights without importing the Keras model.
"""

from __future__ import annotations

from model.config import LlamaConfig


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every float weight; names are `transformer.Params` paths joined by '/'."""
    c = config
    L, M, H, K, D, F = (
        c.num_layers,
        c.hidden_dim,
        c.num_query_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_dim,
    )
    shapes = {
        "token_embedding": (c.vocabulary_size, M),
        "final_norm": (M,),
        "layers/attention_norm": (L, M),
        "layers/query": (L, M, H, D),
        "layers/key": (L, M, K, D),
        "layers/value": (L, M, K, D),
        "layers/attention_output": (L, H, D, M),
        "layers/mlp_norm": (L, M),
        "layers/gate": (L, M, F),
        "layers/up": (L, M, F),
        "layers/down": (L, F, M),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (M, c.vocabulary_size)
    return shapes


# Axes that a matmul kernel reduces over (its input side); int8 scales are per remaining output channel.
# The embedding table is quantized per row (one scale per token).
QUANTIZED_KERNELS: dict[str, tuple[int, ...]] = {
    "layers/query": (1,),
    "layers/key": (1,),
    "layers/value": (1,),
    "layers/attention_output": (1, 2),
    "layers/gate": (1,),
    "layers/up": (1,),
    "layers/down": (1,),
    "lm_head": (0,),
    "token_embedding": (1,),
}
