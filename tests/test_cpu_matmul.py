"""The CPU weight-product kernel (float32 and int8 weights) against XLA's product of the same weights
(model/transformer.py `project`)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.config import LlamaConfig
from model.generation.engine import GenerationEngine
from model.generation.requests import Request
from model.kernels import cpu_matmul, panels


def test_the_kernel_builds_wherever_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: products stay XLA's")
    assert cpu_matmul.available()
    assert cpu_matmul.library_path().exists()


# Rows: one, partial tiles (8 rows with AVX-512, 6 with AVX2), whole tiles, past one 128-row work item. Depths:
# under one 16-wide block, not whole blocks, past one panel's depth (192 with AVX-512, 1536 with AVX2). Columns:
# 1, 2 and 3 vectors per panel, and several panels.
SHAPES = [(1, 16, 16), (7, 40, 32), (64, 576, 192), (13, 600, 80), (130, 577, 1536), (9, 33, 256), (11, 1600, 48)]


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_kernel_equals_the_product(m, k, n, transposed, dtype):
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k), np.float32)
    shape = (n, k) if transposed else (k, n)
    if dtype == "int8":
        w = rng.integers(-127, 128, shape).astype(np.int8)
        scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    else:
        w, scale = rng.standard_normal(shape, np.float32), None
    supported = cpu_matmul.supports(jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale))
    # Fewer rows, or (AVX2 builds) a float32 weight of many rows: XLA's product is faster; the kernel still computes.
    avx2_float_rows = dtype == "float32" and m > cpu_matmul.AVX2_MAX_ROWS and cpu_matmul.vector_lanes() == 8
    assert supported == (m >= cpu_matmul.MIN_ROWS and not avx2_float_rows)
    got = np.asarray(jax.jit(cpu_matmul.matmul, static_argnames="transposed")(x, w, scale, transposed))
    dequantized = (w.T if transposed else w).astype(np.float64) * (1.0 if scale is None else scale)
    expected = x.astype(np.float64) @ dequantized
    tolerance = 2e-6 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    # `project` takes the kernel when asked, and its XLA product (the reference everywhere else) agrees.
    weights = {"w": jnp.asarray(w)} | ({} if scale is None else {"w_scale": jnp.asarray(scale)})

    def project(x, kernel):
        return transformer.project(x, weights, "w", k, transposed=transposed, kernel=kernel)

    project = jax.jit(project, static_argnames="kernel")
    if supported:
        np.testing.assert_array_equal(np.asarray(project(x, True)), got)
    np.testing.assert_allclose(np.asarray(project(x, False)), expected, atol=tolerance, rtol=0)
    # The same weight in panels (the engine's decode layout): the kernel reads it in place, or packs an int8 one
    # from it, and gives the same bits; XLA's product of the panels is the reference again.
    weights["w"] = panels.to_panels(jnp.asarray(w), k, transposed)
    assert weights["w"].data.shape == (n // 16, k, 16)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matmul.matmul)(x, weights["w"], scale)), got)
    if supported:
        np.testing.assert_array_equal(np.asarray(project(x, True)), got)
    np.testing.assert_allclose(np.asarray(project(x, False)), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("layout, dtype", [
    ("array", "float32"), ("array", "int8"), ("panels", "float32"), ("panels", "int8"), ("quads", "int8"),
])
def test_a_layer_of_stacked_weights_equals_the_product_with_that_layers_slice(layout, dtype):
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    if layout == "quads" and not cpu_matmul.quads():
        pytest.skip("int8 weights in quads need an AVX512-VNNI build")
    layers, m, k, n = 3, 24, 64, 80
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    if dtype == "int8":
        w = jnp.asarray(rng.integers(-127, 128, (layers, k, n)).astype(np.int8))
        scale = jnp.asarray((rng.random((layers, 1, n)) * 0.01 + 1e-3).astype(np.float32))
    else:
        w, scale = jnp.asarray(rng.standard_normal((layers, k, n), np.float32)), None
    if layout != "array":
        to = panels.to_quads if layout == "quads" else panels.to_panels
        w = panels.Panels(jax.vmap(lambda layer: to(layer, k).data)(w))
    call = jax.jit(cpu_matmul.layer_matmul)
    for layer in range(layers):
        one = jax.tree.map(lambda a: a[layer], w)
        expected = np.asarray(cpu_matmul.matmul(x, one, None if scale is None else scale[layer]))
        np.testing.assert_array_equal(np.asarray(call(x, w, scale, jnp.int32(layer))), expected)
    # `project` reads a LayerOf in place with the kernel, and as the slice it stands for in XLA's product.
    weights = {"w": transformer.LayerOf(w, jnp.int32(1))}
    if scale is not None:
        weights["w_scale"] = transformer.LayerOf(scale, jnp.int32(1))
    sliced = {"w": jax.tree.map(lambda a: a[1], w)} | ({} if scale is None else {"w_scale": scale[1]})
    kernel = transformer.project(x, weights, "w", k, kernel=True)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(transformer.project(x, sliced, "w", k, kernel=True)))
    np.testing.assert_allclose(np.asarray(transformer.project(x, weights, "w", k)),
                               np.asarray(transformer.project(x, sliced, "w", k)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m, k, n", [(4, 40, 32), (64, 576, 192), (13, 600, 80), (130, 577, 1536)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_argmax_head_picks_the_products_first_largest_column(m, k, n, transposed, dtype):
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(m + k * n)
    x = rng.standard_normal((m, k), np.float32)
    if dtype == "int8":
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    else:
        w, scale = rng.standard_normal((k, n), np.float32), None
    # Ties: column n-1 copies column 0 and column 17 copies 16 (the same panel, and another panel), and rows 0
    # and 1 make those columns their largest, so the first of each pair must win.
    w[:, n - 1], w[:, 17] = w[:, 0], w[:, 16]
    if scale is not None:  # the largest scales, so that the sign-matched rows below pick those columns
        scale[[0, n - 1, 16, 17]] = 0.05
    x[0] = np.sign(w[:, 0]) * 5
    x[1] = np.sign(w[:, 16]) * 5
    w = np.ascontiguousarray(w.T) if transposed else w
    expected = np.asarray(jax.jit(cpu_matmul.matmul, static_argnames="transposed")(x, w, scale, transposed))
    first = np.argmax(expected, axis=-1)  # numpy: the first of equal largest values
    got = np.asarray(jax.jit(cpu_matmul.matmul_argmax, static_argnames="transposed")(x, w, scale, transposed))
    np.testing.assert_array_equal(got, first)
    in_panels = panels.to_panels(jnp.asarray(w), k, transposed)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matmul.matmul_argmax)(x, in_panels, scale)), first)
    assert got[0] == 0 and got[1] == 16 and expected[0, n - 1] == expected[0, 0]


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_greedy_tokens_are_the_first_argmax_of_the_heads_logits(quantization):
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    config, backbone = tiny_tied_model(8, quantization)
    params = backbone.params()
    hidden = jnp.asarray(np.random.default_rng(9).standard_normal((16, config.hidden_dim)), jnp.float32)
    tokens = jax.jit(transformer.greedy_tokens, static_argnames="kernel")
    logits = jax.jit(transformer.logits, static_argnames="kernel")
    np.testing.assert_array_equal(tokens(params, hidden, True), transformer.first_argmax(logits(params, hidden, True)))
    np.testing.assert_array_equal(tokens(params, hidden, False), transformer.first_argmax(logits(params, hidden, False)))


def test_greedy_decode_takes_the_argmax_head_and_keeps_its_text(monkeypatch):
    """A decode step whose rows are all greedy, without penalties, grammar or log-probabilities, gets its tokens
    from the head's argmax kernel; the text is the one XLA's products give."""
    config, backbone = tiny_tied_model(10)
    rng = np.random.default_rng(11)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 60))), 16) for i in range(8)]
    fused = []
    argmax = cpu_matmul.matmul_argmax
    monkeypatch.setattr(cpu_matmul, "matmul_argmax", lambda *args: fused.append(1) or argmax(*args))

    def generate():
        engine = GenerationEngine(backbone, max_slots=4, max_length=96, steps_per_call=4)
        return [c.token_ids for c in engine.generate(requests)]

    with_kernel, without = with_and_without_kernel(monkeypatch, generate)
    assert fused  # traced while the kernel was on (and not since: `available` is off for the second run)
    assert with_kernel == without


def test_operands_the_kernel_is_not_built_for_keep_xlas_product():
    x, scale = jnp.zeros((4, 32), jnp.float32), jnp.ones(24, jnp.float32)
    assert not cpu_matmul.supports(x, jnp.zeros((32, 24), jnp.int8), scale)  # 24 columns: not whole vectors
    scale = jnp.ones(32, jnp.float32)
    assert not cpu_matmul.supports(x, jnp.zeros((32, 32), jnp.float32), scale)  # a float weight with a scale
    assert not cpu_matmul.supports(x, jnp.zeros((32, 32), jnp.int8), None)  # an int8 weight without one
    assert not cpu_matmul.supports(x, jnp.zeros((32, 32), jnp.bfloat16), None)
    assert not cpu_matmul.supports(x.astype(jnp.bfloat16), jnp.zeros((32, 32), jnp.int8), scale)
    assert cpu_matmul.supports(x, jnp.zeros((32, 32), jnp.float32), None)
    assert not cpu_matmul.supports(x[:3], jnp.zeros((32, 32), jnp.float32), None)  # too few rows to pay


@pytest.mark.parametrize("lanes", [16, 8])
def test_an_avx2_build_leaves_float32_products_of_many_rows_to_xla(monkeypatch, lanes):
    """Prefill's 512-row products of [K, N] float32 weights run faster in XLA than in the AVX2 tiles; decode's
    weights in panels (XLA's product of those is slow) and int8 weights stay with the kernel at any rows."""
    monkeypatch.setattr(cpu_matmul, "vector_lanes", lambda: lanes)
    many, few = jnp.zeros((cpu_matmul.AVX2_MAX_ROWS + 1, 32), jnp.float32), jnp.zeros((cpu_matmul.AVX2_MAX_ROWS, 32))
    w = jnp.zeros((32, 32), jnp.float32)
    assert cpu_matmul.supports(many, w, None) == (lanes == 16)
    assert cpu_matmul.supports(few, w, None)
    assert cpu_matmul.supports(many, panels.to_panels(w, 32), None)
    assert cpu_matmul.supports(many, jnp.zeros((32, 32), jnp.int8), jnp.ones(32, jnp.float32))


def test_the_build_reports_its_vector_width():
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    assert cpu_matmul.vector_lanes() in (8, 16)


@pytest.mark.parametrize("quantization, quads", [(None, False), ("int8", False), ("int8", True)])
def test_decode_weights_in_panels_give_the_same_step(quantization, quads):
    """`panels.for_kernel` puts every product the kernel takes into panels (the tied embedding too, whose token
    lookup then reads rows of them; int8 weights in quads when asked), leaves the rest, and a decode step over
    them equals one over the weights as they were, through XLA's products (the reference on every platform) and
    through the kernel; the kernel's quads to within the bound of their activations' 16-bit rounding."""
    from model.kernels.panels import Panels

    config, backbone = tiny_tied_model(12, quantization)
    per_layer = transformer.unstack_layers(backbone.params())
    packed = panels.for_kernel(per_layer, config.hidden_dim, quads=quads)
    assert all(isinstance(layer[name], Panels) and layer[name].quads == quads
               for layer in packed["layers"] for name in panels.LAYER_PRODUCTS)
    assert isinstance(packed["token_embedding"], Panels) and not isinstance(packed["final_norm"], Panels)
    assert not isinstance(packed["layers"][0]["attention_norm"], Panels)
    ids = jnp.asarray([[0, 5, 17, 127]])
    np.testing.assert_array_equal(transformer.embed(packed, ids, jnp.float32), transformer.embed(per_layer, ids, jnp.float32))
    hidden = jnp.asarray(np.random.default_rng(3).standard_normal((8, config.hidden_dim)), jnp.float32)
    logits = jax.jit(transformer.logits, static_argnames="kernel")
    tokens = jax.jit(transformer.greedy_tokens, static_argnames="kernel")
    kernels = (False, True) if cpu_matmul.available() and (cpu_matmul.quads() or not quads) else (False,)
    for kernel in kernels:
        atol = 1e-5
        if kernel and quads:  # |error| <= half a step of each row's rounding times the column's sum of |weights|
            table = np.asarray(backbone.params()["token_embedding"], np.float64)
            scale = np.asarray(backbone.params()["token_embedding_scale"], np.float64).reshape(-1, 1)
            step = np.abs(np.asarray(hidden)).max(axis=1, keepdims=True) / 32639
            atol = (0.5 * step * np.abs(table * scale).sum(axis=1)).max() + 1e-5
        np.testing.assert_allclose(logits(packed, hidden, kernel), logits(per_layer, hidden, kernel), atol=atol)
        np.testing.assert_array_equal(tokens(packed, hidden, kernel), transformer.first_argmax(logits(packed, hidden, kernel)))
        if not (kernel and quads):
            np.testing.assert_array_equal(tokens(packed, hidden, kernel), tokens(per_layer, hidden, kernel))


def test_a_weight_not_in_whole_panels_stays_as_it_is():
    w = jnp.ones((32, 24), jnp.float32)
    with pytest.raises(ValueError, match="whole panels"):
        panels.to_panels(w, 32)
    params = {"token_embedding": jnp.ones((24, 32), jnp.float32), "layers": []}  # 24 tokens: not whole panels
    assert panels.for_kernel(params, 32)["token_embedding"] is params["token_embedding"]


def quads_reference(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The product the quads kernel computes, in numpy: each row of x rounded to integers of at most 32639 in
    magnitude (its largest |x| -> 32639, float32 arithmetic, round to nearest even), exact integer sums against
    the int8 weight [K, N], then the row's step times the column's scale, in float64."""
    top = np.abs(x).max(axis=1, keepdims=True)
    inv = np.divide(np.float32(32639), top, out=np.zeros_like(top), where=top > 0)
    q = np.rint(x * inv).astype(np.int64)
    step = (top / np.float32(32639)).astype(np.float64)
    return (q @ w.astype(np.int64)).astype(np.float64) * step * scale.astype(np.float64)


# Rows: partial and whole 4-row tiles, past a 128-row work item; depths: one quad, not whole 16-byte vectors,
# the demo model's; columns: 1, 2 and 3 vectors per panel, and several panels.
QUAD_SHAPES = [(4, 4, 16), (7, 40, 32), (5, 12, 80), (64, 576, 192), (130, 1536, 48), (9, 20, 1536)]


@pytest.mark.parametrize("m, k, n", QUAD_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_quads_equal_the_product_of_16_bit_activations(m, k, n, transposed):
    """int8 weights in quads (AVX512-VNNI builds): the kernel's product is the exact integer product of the
    activations rounded per row to 16 bits (`quads_reference`) to float32 rounding, within the rounding's bound
    of the weight-only int8 product, and its argmax head picks the first largest column of that product."""
    if not cpu_matmul.quads():
        pytest.skip("this machine's kernel has no quads (no AVX512-VNNI)")
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k), np.float32)
    x[0, 0] = 40.0  # an outlier: its row's step is 10x the others'
    x[m // 2] = 0.0  # a row of zeros: step 0
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    w[:, n - 1] = w[:, 0]  # a tie: the first column must win
    quads = panels.to_quads(jnp.asarray(np.ascontiguousarray(w.T) if transposed else w), k, transposed)
    assert quads.quads and quads.data.shape == (n // 16, k // 4, 16, 4) and quads.inputs == k
    assert cpu_matmul.supports(jnp.asarray(x), quads, jnp.asarray(scale))
    got = np.asarray(jax.jit(cpu_matmul.matmul)(x, quads, scale))
    expected = quads_reference(x, w, scale)
    np.testing.assert_allclose(got, expected, atol=1e-6 * np.abs(expected).max(), rtol=0)
    weight_only = x.astype(np.float64) @ (w.astype(np.float64) * scale)
    step = np.abs(x).max(axis=1, keepdims=True) / 32639
    bound = 0.5 * step * np.abs(w.astype(np.float64) * scale).sum(axis=0) + 1e-6 * np.abs(weight_only).max()
    assert (np.abs(got - weight_only) <= bound).all()
    assert not got[m // 2].any()
    tokens = np.asarray(jax.jit(cpu_matmul.matmul_argmax)(x, quads, scale))
    np.testing.assert_array_equal(tokens, np.argmax(got, axis=-1))
    # `project` takes quads like other panels; its XLA product (other platforms) is the weight-only int8 one.
    weights = {"w": quads, "w_scale": jnp.asarray(scale)}
    project = jax.jit(lambda x, kernel: transformer.project(x, weights, "w", k, kernel=kernel), static_argnames="kernel")
    np.testing.assert_array_equal(np.asarray(project(x, True)), got)
    np.testing.assert_allclose(np.asarray(project(x, False)), weight_only, atol=2e-6 * np.abs(weight_only).max())


def test_quads_hold_the_int8_weight():
    """Quads (uint8, weight + 128, four depths side by side) give back the weight exactly: as panels
    (`matrix`), as rows of the tied embedding (`rows`), and to XLA's product; depths not whole quads refuse."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.integers(-128, 128, (32, 48)).astype(np.int8))  # -128 too: the offset maps it to 0
    quads = panels.to_quads(w, 32)
    assert quads.dtype == jnp.int8 and quads.data.dtype == jnp.uint8 and quads.inputs == 32
    np.testing.assert_array_equal(quads.matrix(), panels.to_panels(w, 32).data)
    table = panels.to_quads(w.T, 32, transposed=True)  # [V, M] as the tied LM head
    ids = jnp.asarray([[0, 17, 47]])
    np.testing.assert_array_equal(panels.rows(table, ids), w.T[ids])
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
    np.testing.assert_allclose(panels.product(x, quads), x @ w.astype(jnp.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="whole quads"):
        panels.to_quads(w[:30], 30)


def tiny_tied_model(seed: int, quantization: str | None = None):
    """(config, backbone): two random layers, every width whole 16-float vectors, the vocabulary too, so that the
    tied LM head runs the kernel transposed."""
    import keras

    from model.backbone import LlamaBackbone

    keras.utils.set_random_seed(seed)
    config = LlamaConfig(vocabulary_size=128, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=64,
                         intermediate_dim=128, max_sequence_length=256, tie_word_embeddings=True)
    backbone = LlamaBackbone(config)
    if quantization:
        backbone.quantize(quantization)
    return config, backbone


def with_and_without_kernel(monkeypatch, run, layouts=(0, 1, 2)):
    """run() with the kernel, asserting that it was traced for these weight layouts (0, 1: prefill's layer products
    and tied LM head, [K, N] and [N, K]; 2: decode's panels, 3: decode's int8 quads), then with XLA's products
    only (programs traced again); both results. Prefill's layer products read their layer of the stacked weights
    (`layer_matmul`)."""
    if not cpu_matmul.available():
        pytest.skip("no kernel on this machine")
    traced = []
    kernel, layer_kernel = cpu_matmul.matmul, cpu_matmul.layer_matmul
    layout = lambda w, transposed=False: int(cpu_matmul._layout(w, transposed)[1])  # noqa: E731
    monkeypatch.setattr(cpu_matmul, "matmul", lambda *args: traced.append(layout(*args[1::2])) or kernel(*args))
    monkeypatch.setattr(cpu_matmul, "layer_matmul", lambda *args: traced.append(layout(args[1])) or layer_kernel(*args))
    jax.clear_caches()
    with_kernel = run()
    assert set(traced) == set(layouts)
    monkeypatch.setattr(cpu_matmul, "available", lambda: False)
    traced.clear()
    jax.clear_caches()
    without = run()
    assert not traced
    return with_kernel, without


@pytest.mark.parametrize("quantization, quads", [(None, False), ("int8", False), ("int8", True)])
def test_generation_with_the_kernel_matches_xlas_products(monkeypatch, quantization, quads):
    """The engine's decode and prefill run the kernel, and give the logits of XLA's products (float32 rounding
    apart: another order of sums, and an int8 scale applied before the sum; with int8 quads, the activations'
    16-bit rounding too) and the same greedy text."""
    if quads and not cpu_matmul.quads():
        pytest.skip("this machine's kernel has no quads (no AVX512-VNNI)")
    monkeypatch.setattr(cpu_matmul, "quads", lambda: quads)
    config, backbone = tiny_tied_model(5, quantization)
    rng = np.random.default_rng(4)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 60))), 16, logprobs=1) for i in range(8)]
    # Prompts past a whole page of the first one's, admitted after it: the prefix cache's context prefill.
    shared = list(rng.integers(1, 90, 40))
    requests.insert(0, Request(8, shared + [5, 6, 7], 16, logprobs=1))
    requests += [Request(9 + i, shared + list(rng.integers(1, 90, 3 + i)), 16, logprobs=1) for i in range(2)]

    def generate():
        engine = GenerationEngine(backbone, max_slots=4, max_length=96, steps_per_call=4)
        completions = engine.generate(requests)
        assert any(shape[0] == "prefill" and shape[-1] > 0 for shape in engine.stats.shapes)  # with context
        return completions

    # With quads, prefill's int8 layer products are in quads too; the tied head stays [N, K].
    with_kernel, without = with_and_without_kernel(monkeypatch, generate, layouts=(1, 3) if quads else (0, 1, 2))
    assert [c.token_ids for c in with_kernel] == [c.token_ids for c in without]
    for a, b in zip(with_kernel, without):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-3 if quads else 1e-4)


def test_scoring_with_the_kernel_matches_xlas_products(monkeypatch):
    """Scoring's packed rows run the kernel too, and give XLA's log-probabilities to float32 rounding."""
    from model.generation import scoring

    # Its packed rows are more than an AVX2 build gives the kernel (`AVX2_MAX_ROWS`): take them to it anyway.
    monkeypatch.setattr(cpu_matmul, "vector_lanes", lambda: 16)

    config, backbone = tiny_tied_model(6)
    rng = np.random.default_rng(7)
    requests = [
        scoring.ScoreRequest(i, list(rng.integers(1, 120, 5 + 7 * i)), list(rng.integers(1, 120, 1 + i)), True)
        for i in range(6)
    ]
    with_kernel, without = with_and_without_kernel(
        monkeypatch, lambda: scoring.score(backbone.params(), config, requests, 128), layouts=(0, 1)  # no decode
    )
    for a, b in zip(with_kernel, without):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
        assert a.tokens == b.tokens > 0


def test_batchgen_cpu_kernels_0_turns_the_kernels_off(monkeypatch):
    from model.kernels import build

    monkeypatch.setenv("BATCHGEN_CPU_KERNELS", "0")
    name = cpu_matmul.NAME
    for symbol, target in (*cpu_matmul.TARGETS.values(), *cpu_matmul.ARGMAX_TARGETS.values()):
        assert build.register.__wrapped__(name, symbol, target) is False  # uncached: the environment is read now
