"""The Llama forward pass as pure functions of a parameter tree.

`LlamaBackbone` owns the Keras variables; this module owns the math, so that one code path serves Keras
`call()` (and therefore `fit()`), the generation engine's jitted prefill and decode steps, and scoring.

Dimension letters: B batch rows, T new tokens, S cached tokens, L layers, H query heads, K KV heads,
G = H / K query heads per KV head, D head dim, M hidden, F MLP hidden, V vocabulary.

Parameters (`params`), every per-layer tensor stacked along a leading L axis so that the layers run as one
`lax.scan` (one compiled layer body instead of L unrolled copies; compile time stays flat in depth):
    token_embedding [V, M]; lm_head [M, V] (absent when tied); final_norm [M];
    layers: attention_norm [L, M], query [L, M, H, D], key [L, M, K, D], value [L, M, K, D],
            attention_output [L, H, D, M], mlp_norm [L, M], gate [L, M, F], up [L, M, F], down [L, F, M].
A quantized kernel `name` is int8 with a float scale `name + "_scale"` broadcastable to its dequantized value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from model import paged_attention, rope
from model.config import LlamaConfig
from model.kernels import cpu_matmul, cpu_packed_attention, panels, platform
from model.kernels.panels import Panels

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerOf:
    """Layer `index` (the loop's traced index) of a weight stacked [L, ...] (an array or Panels), as `_run_layers`
    hands the products' weights to a layer when the CPU kernel may run them: the kernel reads that layer of the
    stacked array where it lies (`cpu_matmul.layer_matmul`); a slice handed to a custom call is copied first,
    every layer of every call (~8% of prefill's op time on the benchmark's main workload)."""

    stacked: Any
    index: jnp.ndarray

    def value(self) -> Any:
        """The layer's slice, for XLA's product (which fuses the slice into its reads)."""
        return jax.tree.map(lambda a: a[self.index], self.stacked)


# Large negative instead of -inf so a fully masked row (padding) gives a uniform softmax, not NaN.
_MASKED = -1e30


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def project(
    x: jnp.ndarray,
    weights: Params,
    name: str,
    inputs: int,
    transposed: bool = False,
    out_dtype: Any = None,
    kernel: bool = False,
) -> jnp.ndarray:
    """x [..., In] times the kernel `name` viewed as a matrix [In, Out] ([Out, In] when `transposed`): [..., Out].

    One 2-D product, accumulated in float32, the result in `out_dtype` (default x's dtype). An int8 kernel (one
    scale per output channel) is converted to x's dtype inside the product and its scale applied to the result,
    a pass over [.., Out] instead of over the weight. Activations stay in float: quantizing them per row to
    multiply in int8 (int32 accumulation) kept 2% of float32's greedy outputs against 27% (see the README's
    benchmark notes). With `kernel`, the product may run as the CPU kernel (`model.kernels.cpu_matmul`: float32
    or int8 weights; an int8 scale applied to the weight before the sum; int8 weights in quads against
    activations rounded per row to 16 bits, which leaves the weight-only logits as they were); the caller passes
    kernel=False for weights split across devices, which XLA cannot split a custom call over.
    """
    w = weights[name]
    scale = weights.get(name + "_scale")
    layer_of = isinstance(w, LayerOf)  # then its scale is one too
    if layer_of:
        stacked, stacked_scale = w.stacked, None if scale is None else scale.stacked
        w, scale = w.value(), None if scale is None else scale.value()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, inputs)
    w2 = _matrix(w, inputs, transposed)

    def xla_product():
        if isinstance(w2, Panels):
            out = panels.product(x2, w2)
        else:
            dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
            out = jax.lax.dot_general(x2, w2.astype(x.dtype), dims, preferred_element_type=jnp.float32)
        return out if scale is None else out * scale.reshape(1, -1)

    if kernel and cpu_matmul.supports(x2, w2, scale) and cpu_matmul.available():
        def kernel_product():
            if layer_of:
                return cpu_matmul.layer_matmul(x2, stacked, stacked_scale, weights[name].index)
            return cpu_matmul.matmul(x2, w2, scale, transposed)

        out = platform.on_cpu(kernel_product, xla_product)
    else:
        out = xla_product()
    return out.astype(out_dtype or x.dtype).reshape(*lead, -1)


def _matrix(w: jnp.ndarray | Panels, inputs: int, transposed: bool) -> jnp.ndarray | Panels:
    """A product's weight as the products take it: [In, Out] ([Out, In] when `transposed`), or Panels as they are
    (the engine's CPU decode weights, `model.kernels.panels`)."""
    if isinstance(w, Panels):
        return w
    return w.reshape(-1, inputs) if transposed else w.reshape(inputs, -1)


def _attention(
    q: jnp.ndarray,
    new_k: jnp.ndarray,
    new_v: jnp.ndarray,
    cache_k: jnp.ndarray | None,
    cache_v: jnp.ndarray | None,
    cache_lengths: jnp.ndarray | None,
    new_visible: jnp.ndarray,
    segment_length: int | None = None,
    context_visible: jnp.ndarray | None = None,
    segment_starts: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Grouped-query attention of new tokens over (cached tokens, new tokens).

    q [B, T, H, D]; new_k/new_v [B, T, K, D]; cache_k/cache_v [B, K, S, D] or None; cache_lengths [B]:
    cached keys j < cache_lengths[b] are visible; new_visible [B, T(query), T(key)]: which new tokens each new
    token sees (see `visibility`); segment_length: a bound on each packed segment's new tokens (see
    `_self_attention`). context_visible [B, T, S], instead of cache_lengths: which cached keys each new token
    sees, for rows of packed prompts that each continue their own cached pages (`_self_attention`'s context).
    segment_starts [B * T]: where each token's own prompt starts (`cpu_packed_attention.segment_starts`), given
    where the CPU kernel may compute attention of packed prompts, with or without a context (the same
    visibility, fewer scores), instead of `_self_attention`.
    K/V are never repeated to H heads: queries are grouped as [B, T, K, G, D] instead.
    Scores over the cache and over the new block are computed apart and joined after, so the (large)
    cache is only read, never copied.
    """
    b, t, h, d = q.shape
    k_heads = new_k.shape[2]
    g = h // k_heads
    qg = q.reshape(b, t, k_heads, g, d) * jnp.asarray(d**-0.5, q.dtype)
    if cache_k is None or context_visible is not None:
        context = None if cache_k is None else (cache_k, cache_v, context_visible)

        def xla_attention():
            return _self_attention(qg, new_k, new_v, new_visible, segment_length, context)

        if (segment_starts is not None and cpu_packed_attention.supports(qg) and (context is None or b == 1)
                and cpu_packed_attention.available()):
            out = platform.on_cpu(
                lambda: cpu_packed_attention.attend(qg, new_k, new_v, segment_starts, context), xla_attention
            )
        else:
            out = xla_attention()
        return out.reshape(b, t, h, d)
    new_scores = jnp.einsum("btkgd,bskd->bkgts", qg, new_k, preferred_element_type=jnp.float32)
    new_scores = jnp.where(new_visible[:, None, None], new_scores, _MASKED)
    s = cache_k.shape[2]
    cache_visible = jnp.arange(s)[None, :] < cache_lengths[:, None]  # [B, S]
    if t == 1:
        # One query per row (decode): a multiply-reduce that XLA fuses into one pass over the cache. XLA's
        # batched dot is slow for such thin [G, D] x [D, S] products: 3.7x slower on the demo's decode shapes.
        q1 = qg[:, 0].astype(jnp.float32)  # [B, K, G, D]
        cache_scores = jnp.sum(q1[:, :, :, None, :] * cache_k[:, :, None].astype(jnp.float32), axis=-1)
        cache_scores = cache_scores[:, :, :, None]  # [B, K, G, 1, S]
    else:
        cache_scores = jnp.einsum("btkgd,bksd->bkgts", qg, cache_k, preferred_element_type=jnp.float32)
    cache_scores = jnp.where(cache_visible[:, None, None, None, :], cache_scores, _MASKED)
    probs = jax.nn.softmax(jnp.concatenate([cache_scores, new_scores], axis=-1), axis=-1)
    probs = probs.astype(new_v.dtype)
    if t == 1:
        from_cache = jnp.sum(probs[:, :, :, 0, :s, None] * cache_v[:, :, None], axis=-2)[:, None]  # [B,1,K,G,D]
    else:
        from_cache = jnp.einsum("bkgts,bksd->btkgd", probs[..., :s], cache_v)
    out = from_cache + jnp.einsum("bkgts,bskd->btkgd", probs[..., s:], new_v)
    return out.reshape(b, t, h, d)


def visibility(token_mask: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Which new tokens each new token attends to: [B, T(query), T(key)] bool.

    Causal, only real keys (token_mask [B, T]); with segment_ids [B, T], only keys of the same segment, so that
    several prompts packed into one row (see the engine's prefill) do not see each other.
    """
    t = token_mask.shape[1]
    visible = jnp.tril(jnp.ones((t, t), bool))[None] & token_mask[:, None, :]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return visible


# attend(q [B,T,H,D], k [B,T,K,D], v [B,T,K,D], layer_cache) -> ([B,T,H,D], out): attention of the new tokens, and
# what the layer hands back (the new keys and values, or the layer's cache with them written in); layer_cache is
# whatever per-layer part of a cache the caller passes alongside the layer weights.
Attend = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, Any], tuple[jnp.ndarray, Any]]


def _self_attention(
    qg: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    visible: jnp.ndarray,
    segment_length: int | None = None,
    context: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray] | None = None,
) -> jnp.ndarray:
    """Attention of T tokens among themselves: qg [B, T, K, G, D] (scaled), k/v [B, T, K, D] -> [B, T, K, G, D].
    `segment_length`: a bound on the tokens of each packed segment (see `_banded_self_attention`), or None.
    `context`: (keys [B, K, S, D], values [B, K, S, D], visible [B, T, S]) cached keys before the row that each
    token may see too: the cached first pages of packed prompts (the engine's prefill with prompt sharing).
    Their scores join each query block's before one softmax.

    All G query heads of a KV head are the rows of one product, [G*T, D] x [D, T]: one large matmul per KV
    head instead of G thin ones (2x faster for a 512-token packed prefill row on CPU). A long row is cut into
    4 blocks of queries, block i scoring only the keys of blocks 0..i: the causal mask hides the rest, so 6 of
    16 score blocks are never computed (a further 1.8x on a 512-token row).
    """
    b, t, k_heads, g, d = qg.shape
    if segment_length is not None and 2 * segment_length <= t and t % segment_length == 0:
        return _banded_self_attention(qg, k, v, visible, segment_length, context)
    rows = qg.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    blocks = 4 if t >= 256 and t % 4 == 0 else 1
    size = t // blocks
    outs = []
    for i in range(blocks):
        begin, end = i * size, (i + 1) * size  # queries of this block see keys before `end`
        block_rows = rows[:, :, :, begin:end].reshape(b, k_heads, g * size, d)
        scores = jnp.einsum("bkqd,bksd->bkqs", block_rows, keys[:, :, :end], preferred_element_type=jnp.float32)
        scores = scores.reshape(b, k_heads, g, size, end)
        scores = jnp.where(visible[:, None, None, begin:end, :end], scores, _MASKED)
        if context is not None:
            scores = _with_context_scores(scores, block_rows, context[0], context[2][:, begin:end])
        s = scores.shape[-1] - end  # context keys first
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, k_heads, g * size, s + end)
        out = jnp.einsum("bkqs,bksd->bkqd", probs[..., s:], values[:, :, :end])
        if context is not None:
            out = out + jnp.einsum("bkqs,bksd->bkqd", probs[..., :s], context[1].astype(v.dtype))
        outs.append(out.reshape(b, k_heads, g, size, d))
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4)


def _with_context_scores(
    scores: jnp.ndarray, rows: jnp.ndarray, context_k: jnp.ndarray, context_visible: jnp.ndarray
) -> jnp.ndarray:
    """A query block's scores [B, K, (n,) G, Q, S'] with the scores of the same queries, rows [B, K, (n,) G*Q, D],
    over context keys [B, K, S, D] before them (masked where context_visible [B, (n,) Q, S] is False)."""
    s = context_k.shape[2]
    spec = "bkiqd,bksd->bkiqs" if rows.ndim == 5 else "bkqd,bksd->bkqs"
    extra = jnp.einsum(spec, rows, context_k.astype(rows.dtype), preferred_element_type=jnp.float32)
    extra = extra.reshape(scores.shape[:-1] + (s,))
    visible = context_visible[:, None, :, None] if rows.ndim == 5 else context_visible[:, None, None]
    return jnp.concatenate([jnp.where(visible, extra, _MASKED), scores], axis=-1)


def _banded_self_attention(
    qg: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    visible: jnp.ndarray,
    width: int,
    context: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray] | None = None,
) -> jnp.ndarray:
    """`_self_attention` of a row of packed segments of at most `width` tokens each (T a multiple of it).

    A token sees only keys of its own segment, so none further back than width - 1 positions: cut the row into
    blocks of `width` queries, block i scores only the keys of blocks i-1 and i, [G*W, D] x [D, 2W] per KV
    head. A 512-token row of ~35-token chat prompts (W = 64) computes 2TW = 65k scores instead of the 164k of
    the causal blocks above: 2.2x less attention time per layer on CPU.
    """
    b, t, k_heads, g, d = qg.shape
    n = t // width
    rows = qg.reshape(b, n, width, k_heads, g, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, k_heads, n, g * width, d)

    def pairs(x):  # [B, T, ...] -> [B, n, 2W, ...]: blocks i-1 and i for each i, zeros before the first
        x = jnp.pad(x, ((0, 0), (width, 0)) + ((0, 0),) * (x.ndim - 2))
        return jnp.stack([x[:, i * width : (i + 2) * width] for i in range(n)], axis=1)

    keys, values = pairs(k), pairs(v)  # [B, n, 2W, K, D]
    visible = jnp.pad(visible, ((0, 0), (0, 0), (width, 0)))  # the keys axis shifted as `pairs` shifts keys
    # [B, n, W, 2W]: which of block i's keys each of its queries sees
    band = jnp.stack([visible[:, i * width : (i + 1) * width, i * width : (i + 2) * width] for i in range(n)], axis=1)
    scores = jnp.einsum("bkiqd,biskd->bkiqs", rows, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k_heads, n, g, width, 2 * width)
    scores = jnp.where(band[:, None, :, None], scores, _MASKED)
    if context is not None:  # [B, T, S] -> [B, n, W, S]: what block i's queries see of the context
        blocked = context[2].reshape(b, n, width, context[2].shape[-1])
        scores = _with_context_scores(scores, rows, context[0], blocked)
    s = scores.shape[-1] - 2 * width
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, k_heads, n, g * width, s + 2 * width)
    out = jnp.einsum("bkiqs,biskd->bkiqd", probs[..., s:], values)
    if context is not None:
        out = out + jnp.einsum("bkiqs,bksd->bkiqd", probs[..., :s], context[1].astype(v.dtype))
    out = out.reshape(b, k_heads, n, g, width, d)
    return out.transpose(0, 2, 4, 1, 3, 5).reshape(b, t, k_heads, g, d)


def _decoder_layer(
    config: LlamaConfig,
    x: jnp.ndarray,
    layer: Params,
    rotation: rope.Rotation,
    attend: Attend,
    layer_cache: Any,
    kernel: bool = False,
) -> tuple[jnp.ndarray, Any]:
    """One pre-norm block: x + attention(norm(x)), then + SwiGLU(norm(x)). Returns x and what `attend` handed back.
    `kernel`: products may run as the CPU kernel (see `project`)."""
    h = rms_norm(x, layer["attention_norm"], config.layer_norm_epsilon)
    b, t, m = h.shape
    heads, kv_heads = config.num_query_heads, config.num_key_value_heads
    q = project(h, layer, "query", m, kernel=kernel).reshape(b, t, heads, -1)
    k = project(h, layer, "key", m, kernel=kernel).reshape(b, t, kv_heads, -1)
    v = project(h, layer, "value", m, kernel=kernel).reshape(b, t, kv_heads, -1)
    q = rope.rotate(q, rotation)
    k = rope.rotate(k, rotation)
    attended, out = attend(q, k, v, layer_cache)
    # Every product as one [B*T, In] x [In, Out] matrix product: contracting (h, d) as two axes made XLA copy the
    # attention output weight on every call.
    attended = attended.reshape(b, t, -1)
    x = x + project(attended, layer, "attention_output", attended.shape[-1], kernel=kernel)
    h = rms_norm(x, layer["mlp_norm"], config.layer_norm_epsilon)
    gate = project(h, layer, "gate", m, kernel=kernel)
    up = project(h, layer, "up", m, kernel=kernel)
    x = x + project(jax.nn.silu(gate) * up, layer, "down", gate.shape[-1], kernel=kernel)
    return x, out


def _run_layers(
    params: Params,
    config: LlamaConfig,
    token_ids: jnp.ndarray,
    positions: jnp.ndarray,
    dtype: Any,
    attend: Attend,
    cache: Any,
    kernel: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Embedding, every layer as one `lax.scan` (cache: a pytree with a leading L axis, or None), final norm."""
    b, t = token_ids.shape
    assert positions.shape == (b, t), (positions.shape, token_ids.shape)
    dtype = _compute_dtype(params, dtype)
    rotation = rope.rotation(positions, rope.inverse_frequencies(config))
    x = embed(params, token_ids, dtype)

    layers = params["layers"]
    # With the CPU kernel the products' weights stay stacked, closed over, each handed to its layer as LayerOf;
    # the loop slices the rest (norms).
    stacked_names = [n for n in layers if n.removesuffix("_scale") in panels.LAYER_PRODUCTS] if kernel else []
    sliced = {n: w for n, w in layers.items() if n not in stacked_names}
    indices = jnp.arange(len(jax.tree.leaves(layers)[0]), dtype=jnp.int32)

    def body(x, xs):
        layer, index, layer_cache = xs
        layer = {**layer, **{n: LayerOf(layers[n], index) for n in stacked_names}}
        return _decoder_layer(config, x, layer, rotation, attend, layer_cache, kernel)

    x, (new_k, new_v) = jax.lax.scan(body, x, (sliced, indices, cache))
    x = rms_norm(x, params["final_norm"], config.layer_norm_epsilon)
    return x, new_k, new_v


def _compute_dtype(params: Params, dtype: Any) -> Any:
    dtype = dtype or params["token_embedding"].dtype  # an array, or Panels (`model.kernels.panels`)
    return jnp.float32 if dtype == jnp.int8 else dtype


def forward(
    params: Params,
    config: LlamaConfig,
    token_ids: jnp.ndarray,
    positions: jnp.ndarray,
    token_mask: jnp.ndarray | None = None,
    cache_k: jnp.ndarray | None = None,
    cache_v: jnp.ndarray | None = None,
    cache_lengths: jnp.ndarray | None = None,
    dtype: Any = None,
    segment_ids: jnp.ndarray | None = None,
    segment_length: int | None = None,
    kernel: bool = False,
    context_visible: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Runs the decoder over new tokens, optionally after cached ones.

    token_ids, positions [B, T] int; token_mask [B, T] bool (default all real); cache_k/cache_v
    [L, B, K, S, D] read-only, with cache_lengths [B] valid entries per row; segment_ids [B, T]: several
    sequences packed in a row, each attending only to itself (see `visibility`); segment_length (static): a
    bound on every segment's tokens, which lets attention skip keys further back (`_banded_self_attention`);
    kernel: products, and attention among packed segments (alone or after a context), may run as CPU kernels (see
    `project`, `model.kernels.cpu_packed_attention`); context_visible [B, T, S], instead of
    cache_lengths: which cached keys each new token sees (packed prompts that each continue their own cached
    pages; the cache then holds those pages, `_self_attention`'s context).
    Returns the final-normed hidden states [B, T, M] and the new tokens' keys and values [L, B, T, K, D], which
    the caller writes into its cache (see `model.generation.kv_cache`).
    """
    b, t = token_ids.shape
    if token_mask is None:
        token_mask = jnp.ones((b, t), bool)
    new_visible = visibility(token_mask, segment_ids)
    # Packed prompts (the engine's prefill, scoring) lie whole one after another, so a token sees exactly the keys
    # from its prompt's start to itself, after the context keys it continues, if any: what the CPU kernel walks.
    packed = segment_ids is not None and (cache_k is None or context_visible is not None)
    starts = cpu_packed_attention.segment_starts(jnp.where(token_mask, segment_ids, -1)) if packed and kernel else None

    def attend(q, k, v, layer_cache):
        layer_cache_k, layer_cache_v = layer_cache if layer_cache is not None else (None, None)
        attended = _attention(
            q, k, v, layer_cache_k, layer_cache_v, cache_lengths, new_visible, segment_length, context_visible,
            starts,
        )
        return attended, (k, v)

    cache = None if cache_k is None else (cache_k, cache_v)
    return _run_layers(params, config, token_ids, positions, dtype, attend, cache, kernel)


def unstack_layers(params: Params, each: Callable[[Params], Params] | None = None) -> Params:
    """The parameters with `layers` as a list of L per-layer trees instead of stacked [L, ...] arrays, each passed
    through `each` as it is sliced (so a transformed copy never needs all the slices at once).

    `decode_paged` runs its layers unrolled over these: a layer body inside `lax.scan` slices each stacked weight,
    and XLA copies every such slice before the matmul reads it (~0.4 GB per decode step for the demo model).
    """
    stacked = params["layers"]
    layers = len(jax.tree.leaves(stacked)[0])
    each = each or (lambda layer: layer)
    sliced = lambda i: {name: jax.tree.map(lambda a: a[i], w) for name, w in stacked.items()}  # noqa: E731 - Panels too
    return {**params, "layers": [each(sliced(i)) for i in range(layers)]}


def decode_paged(
    params: Params,
    config: LlamaConfig,
    token_ids: jnp.ndarray,
    pages_k: tuple[jnp.ndarray, ...],
    pages_v: tuple[jnp.ndarray, ...],
    view: paged_attention.PageView,
    rotation: rope.Rotation,
    write: Callable[[Any, Any, jnp.ndarray, jnp.ndarray], tuple[Any, Any]],
    chunks: int,
    dtype: Any = None,
    kernel: bool = False,
) -> tuple[jnp.ndarray, tuple, tuple]:
    """One decode step, one new token per slot, over a paged cache (see `model.paged_attention`).

    params: with per-layer `layers` (`unstack_layers`); token_ids [B, 1] sit at position view.lengths, whose
    rotation [B, 1, 1, D] the caller computes (`rope.rotation`: a decode call, once for all its steps); pages_k[l]
    and pages_v[l] are layer l's pool in chunks of pages (see `model.generation.paged_cache`).
    The new token's key and value go into a layer's first `chunks` chunks at view.write_pages, then attention
    reads those, the new token's own entry among them (`paged_attention.step_attention`; `write(chunks_k,
    chunks_v, k [B, K, D], v [B, K, D])` is its XLA write). Writing before reading lets XLA update each pool in
    place: a read of the old pool scheduled after the write would make it copy the whole pool. `kernel`:
    attention and products may run as the CPU kernels (`paged_attention.step_attention`, `project`).
    Returns the final-normed hidden states [B, 1, M] and the updated pools.
    """
    dtype = _compute_dtype(params, dtype)
    x = embed(params, token_ids, dtype)
    new_k, new_v = [], []
    for layer, chunks_k, chunks_v in zip(params["layers"], pages_k, pages_v):

        def attend(q, k, v, read):
            attended, read_k, read_v = paged_attention.step_attention(q, k[:, 0], v[:, 0], *read, view, write, kernel)
            return attended, (read_k, read_v)

        # Only the first `chunks` chunks of each pool are read and written; the rest pass through untouched.
        x, (read_k, read_v) = _decoder_layer(
            config, x, layer, rotation, attend, (chunks_k[:chunks], chunks_v[:chunks]), kernel
        )
        new_k.append(tuple(read_k) + tuple(chunks_k[chunks:]))
        new_v.append(tuple(read_v) + tuple(chunks_v[chunks:]))
    x = rms_norm(x, params["final_norm"], config.layer_norm_epsilon)
    return x, tuple(new_k), tuple(new_v)


def embed(params: Params, token_ids: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    table = params["token_embedding"]
    rows = panels.rows(table, token_ids) if isinstance(table, Panels) else jnp.take(table, token_ids, axis=0)
    scale = params.get("token_embedding_scale")
    if scale is not None:  # int8 rows with one scale per row
        rows = rows.astype(jnp.float32) * jnp.take(scale, token_ids, axis=0)
    return rows.astype(dtype)


def first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """The index of the first maximum along the last axis (as `jnp.argmax`, about 3x faster on CPU)."""
    n = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(x == top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(index, n - 1)  # a NaN row matches nowhere; keep the index in range


def greedy_tokens(params: Params, hidden: jnp.ndarray, kernel: bool = False) -> jnp.ndarray:
    """The LM head's first largest logit per row, hidden [B, M] -> [B] int32: `first_argmax(logits(...))`.

    With `kernel`, on CPU the product kernel returns each row's best column directly
    (`cpu_matmul.matmul_argmax`): the [B, V] logits, 12.6 MB for the demo model at 64 rows, are never written and
    read back. The caller uses it only where nothing else needs the logits (greedy rows, no penalties, grammar or
    log-probabilities)."""
    m = hidden.shape[-1]
    name, transposed = ("lm_head", False) if "lm_head" in params else ("token_embedding", True)
    w, scale = params[name], params.get(name + "_scale")
    x = hidden.reshape(-1, m)
    w2 = _matrix(w, m, transposed)
    reference = lambda: first_argmax(logits(params, hidden, kernel))  # noqa: E731
    if kernel and cpu_matmul.supports(x, w2, scale) and cpu_matmul.available():
        fused = lambda: cpu_matmul.matmul_argmax(x, w2, scale, transposed).reshape(hidden.shape[:-1])  # noqa: E731
        return platform.on_cpu(fused, reference)
    return reference()


def logits(params: Params, hidden: jnp.ndarray, kernel: bool = False) -> jnp.ndarray:
    """LM head: hidden [..., M] -> float32 logits [..., V]; the tied head reuses the embedding table [V, M].
    `kernel`: the head may run as the CPU kernel (see `project`)."""
    m = hidden.shape[-1]
    if "lm_head" in params:
        return project(hidden, params, "lm_head", m, out_dtype=jnp.float32, kernel=kernel)
    return project(hidden, params, "token_embedding", m, transposed=True, out_dtype=jnp.float32, kernel=kernel)
