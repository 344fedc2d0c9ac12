// Weight products on CPU: y [M, N] = x [M, K] . w, float32 activations and accumulation, w float32 or int8 with
// one scale per output channel (the engine's weight-only int8: the same quantized weights, activations never
// quantized).
//
// Each block of the weight is copied (an int8 one widened and scaled) once into a small float panel that stays
// in cache, and every row of x is run against it in register tiles. XLA's int8 product converts the weight inside
// its product, a pass over the whole weight for every 16 columns it computes, which at 64 rows cost more than the
// halved reads save; here the conversion is paid once per call and a quarter of float32's bytes come from memory.
//
// Layout (`layout`): w is [K, N] (a Dense kernel), [N, K] (the tied embedding as the LM head), or panels
// [N / 16, K, 16]: each 16 columns' weights depth after depth, the layout the engine stores its weights in for this
// kernel (`model/kernels/panels.py`). A float32 weight in panels needs no copy: the tiles read it in place, three
// contiguous streams, which the hardware prefetcher follows (copying the weight into a panel was ~15% of a
// decode step: a pass over every weight, serialized before the tiles that use it). N must be whole 16-float
// vectors. Work items are (128 rows of x) x (48 columns of w), spread over XLA's intra-op
// threads.
//
// The argmax handlers are the LM head of a greedy step: instead of y they return, per row and per 48-column
// panel, the panel's largest value and the first column holding it, so the [M, V] logits are never written to
// memory and read back (the caller picks the first panel with the row's largest value). The tiles are computed
// as for y, so the values, and the chosen token, are the same.
//
// Blocking (M = 64, K = 576, N = 1536). AVX-512 (2-core Xeon): an 8-row x 48-column tile is 24 accumulator
// registers, each panel vector loaded once per 8 rows and each x value broadcast once per 3 vectors; panels of
// 192 depths (36 KiB) fit L1. AVX2 with FMA (2-core EPYC, Zen 2): 6-row x 16-column tiles (12 of the 16
// registers), one 16-column group of the panel after another, panels of the whole depth. A panel, not the weight
// in place: rows of a [K, N] weight lie N floats apart, so a block of them maps onto a few L1 sets and evicts
// itself. The build picks the path by the compiler's target (-march=native); a CPU with neither fails to build,
// and its products stay XLA's.
//
// int8 weights in quads (layout 3, AVX512-VNNI builds only): uint8 [N / 16, K / 4, 16, 4], each weight + 128, the
// four depths of a column that one `vpdpbusd` lane sums side by side. The activations are rounded per row to
// 16-bit integers (q = round(x / s), |q| <= 32639, s = the row's largest |x| / 32639) and split into two int8
// halves, q = 256 * hi + lo; each half meets the weights in `vpdpbusd` (64 multiply-adds an instruction, int32
// sums), and the +128 of the weights comes off as 128 x the row's sum of that half. Two instructions do what 8
// float32 FMAs do, and the result is the weight-only int8 product's up to the activations' 16-bit rounding
// (2^-16 of the row's largest value, well below the weights' own rounding). See the README's int8 notes.

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_vector.h"
#include "xla/ffi/api/ffi.h"

#if !BATCHGEN_VECTOR
#error "cpu_matmul needs AVX-512, or AVX2 with FMA"
#endif

namespace ffi = xla::ffi;

namespace {

using batchgen::Broadcast;
using batchgen::Fma;
using batchgen::kLanes;
using batchgen::Load;
using batchgen::Mul;
using batchgen::Store;
using batchgen::Vec;
using batchgen::Zero;

#ifdef __AVX512F__
// Tile shape: 8 rows x (up to 3 groups of 16 columns) is 24 of the 32 registers accumulating. Panels of 192
// depths (36 KiB) fit L1.
constexpr int kRows = 8;
constexpr int kTileGroups = 3;
constexpr int64_t kDepth = 192;
#else
// Tile shape: 6 rows x one group of 16 columns (two registers) is 12 of the 16 registers accumulating, two hold
// the weights and one the broadcast x value (the shape of BLIS's and OpenBLAS's AVX2 kernels).
constexpr int kRows = 6;
constexpr int kTileGroups = 1;
// Depths per panel: the whole depth of the demo model's products, so y is written once (on a 2-core EPYC
// (Zen 2, 512 KiB L2) 6% faster than 192 depths at 64 rows, products 106 vs 113 ms).
constexpr int64_t kDepth = 1536;
#endif
constexpr int kPerGroup = 16 / kLanes;  // registers per group of 16 columns

constexpr int kPanel = 48;        // columns of w per panel (3 groups of 16)
constexpr int64_t kChunk = 128;   // rows of x per work item

// w [K, N], [N, K], panels [N / 16, K, 16], quads [N / 16, K / 4, 16, 4] (uint8 weights only)
enum Layout : int32_t { kRowsLayout = 0, kTransposedLayout = 1, kPanelsLayout = 2, kQuadsLayout = 3 };
inline Layout AsLayout(int32_t layout) {
  return layout == 1 ? kTransposedLayout : layout == 2 ? kPanelsLayout : layout == 3 ? kQuadsLayout : kRowsLayout;
}

// kLanes scales from `scale`, or ones for a float weight (no scale).
inline Vec Scales(const float* scale) { return scale ? Load(scale) : Broadcast(1.0f); }

// panel [kc, V*16] = w[k0 .. k0+kc, n0 .. n0+V*16] * scale, from w [K, N] (`w` points at [k0, n0]).
template <int V, typename T>
void PackRows(const T* w, int64_t n, const float* scale, int64_t kc, float* panel) {
  constexpr int U = V * kPerGroup;  // registers across the panel
  Vec s[U];
  for (int u = 0; u < U; ++u) s[u] = Scales(scale ? scale + u * kLanes : nullptr);
  for (int64_t p = 0; p < kc; ++p)
    for (int u = 0; u < U; ++u) Store(panel + p * V * 16 + u * kLanes, Mul(s[u], Load(w + p * n + u * kLanes)));
}

// The same panel from panels [N / 16, K, 16] (`w` points at [n0 / 16, k0, 0]): contiguous reads, widened and scaled.
template <int V, typename T>
void PackPanels(const T* w, int64_t k, const float* scale, int64_t kc, float* panel) {
  constexpr int U = V * kPerGroup;
  Vec s[U];
  for (int u = 0; u < U; ++u) s[u] = Scales(scale ? scale + u * kLanes : nullptr);
  for (int64_t p = 0; p < kc; ++p)
    for (int u = 0; u < U; ++u) {
      const int v = u / kPerGroup, lane = (u % kPerGroup) * kLanes;
      Store(panel + p * V * 16 + u * kLanes, Mul(s[u], Load(w + (v * k + p) * 16 + lane)));
    }
}

#ifdef __AVX512F__
// r[c] = column c of the 16 x 16 block whose row j is r[j] (three rounds of shuffles, within lanes then across).
inline void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int g = 0; g < 4; ++g) {
    t[4 * g + 0] = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]);
    t[4 * g + 1] = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    t[4 * g + 2] = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
    t[4 * g + 3] = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + e]: column 4L + e of rows 4g .. 4g+3, in each 128-bit lane L
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm512_shuffle_f32x4(u[e], u[e + 4], 0x88);
    t[e + 4] = _mm512_shuffle_f32x4(u[e], u[e + 4], 0xDD);
    t[e + 8] = _mm512_shuffle_f32x4(u[e + 8], u[e + 12], 0x88);
    t[e + 12] = _mm512_shuffle_f32x4(u[e + 8], u[e + 12], 0xDD);
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xDD);
  }
}

#endif

// The same panel from w [N, K] (`w` points at [n0, k0]): 16 x 16 blocks widened, transposed and scaled (AVX-512);
// an AVX2 build gathers column by column (the [N, K] layout is only the tied embedding as prefill's LM head: a
// decode step reads it from panels).
template <int V, typename T>
void PackTransposed(const T* w, int64_t k, const float* scale, int64_t kc, float* panel) {
  for (int v = 0; v < V; ++v) {
    const T* rows = w + v * 16 * k;
    int64_t p = 0;
#ifdef __AVX512F__
    const __m512 s = Scales(scale ? scale + v * 16 : nullptr);
    for (; p + 16 <= kc; p += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = Load(rows + j * k + p);
      Transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(panel + ((p + i) * V + v) * 16, _mm512_mul_ps(s, r[i]));
    }
#endif
    for (; p < kc; ++p)
      for (int j = 0; j < 16; ++j) panel[(p * V + v) * 16 + j] = rows[j * k + p] * (scale ? scale[v * 16 + j] : 1.0f);
  }
}

// y[R rows, V*16] (+)= x[R rows, kc] . panel[kc, V*16]; `first`: the first depth block overwrites y. The 16
// weights of depth p and group v are at panel + p * ps + v * vs: a packed panel (ps = V*16, vs = 16) or a
// float32 weight in panels, read in place (ps = 16, vs = K*16).
template <int R, int V>
void Tile(const float* __restrict x, int64_t ldx, const float* __restrict panel, int64_t ps, int64_t vs, int64_t kc,
          float* __restrict y, int64_t ldy, bool first) {
  constexpr int U = V * kPerGroup;  // registers across the tile
  Vec acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = first ? Zero() : Load(y + r * ldy + u * kLanes);
  for (int64_t p = 0; p < kc; ++p) {
    Vec w[U];
    for (int u = 0; u < U; ++u)  // in place: XLA's alignment
      w[u] = Load(panel + p * ps + (u / kPerGroup) * vs + (u % kPerGroup) * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec xr = Broadcast(x[r * ldx + p]);
      for (int u = 0; u < U; ++u) acc[r][u] = Fma(xr, w[u], acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) Store(y + r * ldy + u * kLanes, acc[r][u]);
}

// All `rows` rows of x against G groups of columns, in tiles of kRows rows.
template <int G>
void TileRows(const float* x, int64_t rows, int64_t k, const float* panel, int64_t ps, int64_t vs, int64_t kc,
              float* y, int64_t ldy, bool first) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) Tile<kRows, G>(x + r * k, k, panel, ps, vs, kc, y + r * ldy, ldy, first);
  x += r * k;
  y += r * ldy;
  switch (rows - r) {
    case 7: return Tile<7, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 6: return Tile<6, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 5: return Tile<5, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 4: return Tile<4, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 3: return Tile<3, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 2: return Tile<2, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    case 1: return Tile<1, G>(x, k, panel, ps, vs, kc, y, ldy, first);
    default: return;
  }
}

// x [rows, kc] times a panel of V groups of 16 columns, a tile's worth of groups (kTileGroups) at a time: with
// AVX-512 the whole panel (V <= 3), with AVX2 one group after another, each against every row.
template <int V>
void Tiles(const float* x, int64_t rows, int64_t k, const float* panel, int64_t ps, int64_t vs, int64_t kc, float* y,
           int64_t n, bool first) {
  constexpr int G = std::min(V, kTileGroups);
  static_assert(V % G == 0, "a panel is whole tiles of groups");
  for (int v = 0; v < V; v += G) TileRows<G>(x, rows, k, panel + v * vs, ps, vs, kc, y + v * 16, n, first);
}

// x [M, K] as 16-bit integers per row, for the quads' products: q = round(x * levels / max |x|) = 256 * hi + lo.
struct Quantized {
  std::vector<int8_t> hi, lo;  // [M, K]
  std::vector<float> step;     // [M]: what one unit of q is worth (max |x| / kLevels)
  std::vector<int32_t> sums;   // [M, 2]: the row's sum of hi and of lo (times 128: what the weights' offset adds)
};

template <typename T>
struct Problem {
  const float* x;
  const T* w;
  const float* scale;
  float* y;
  int64_t m, k, n;
  Layout layout;
  const Quantized* quantized = nullptr;  // quads only
};

#ifdef __AVX512VNNI__
constexpr bool kQuads = true;
constexpr float kLevels = 32639.0f;  // |q| <= 32639 keeps hi = (q + 128) >> 8 within int8
// A quads tile: 2 rows x 3 groups x 2 halves = 12 accumulators. gcc keeps a copy of each `vpdpbusd` accumulator
// (its destination is also its source) and spilled 3- and 4-row tiles to the stack inside the loop: the demo
// model's products at 64 rows (Zen 4) took 95 ms with 4 rows, 58.5 with 3, 49.6 with 2 (float32 tiles: 95.9).
constexpr int kQuadRows = 2;

// Rounds each row of x [m, k] to 16-bit integers and splits them (`Quantized`). Rounding is to nearest even, as
// numpy's rint after the same float32 multiply (the tests' reference).
void Quantize(const float* x, int64_t m, int64_t k, Quantized& out) {
  out.hi.resize(m * k);
  out.lo.resize(m * k);
  out.step.resize(m);
  out.sums.resize(2 * m);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    __m512 top = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
    float max = _mm512_reduce_max_ps(top);
    for (int64_t t = c; t < k; ++t) max = std::max(max, std::abs(row[t]));
    const float inv = max > 0.0f ? kLevels / max : 0.0f;
    out.step[r] = max / kLevels;
    int8_t* hi = out.hi.data() + r * k;
    int8_t* lo = out.lo.data() + r * k;
    __m512i hi_sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
    for (c = 0; c + 16 <= k; c += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + c), _mm512_set1_ps(inv)));
      const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
      const __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + c), _mm512_cvtepi32_epi8(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + c), _mm512_cvtepi32_epi8(l));
      hi_sum = _mm512_add_epi32(hi_sum, h);
      lo_sum = _mm512_add_epi32(lo_sum, l);
    }
    int32_t hs = _mm512_reduce_add_epi32(hi_sum), ls = _mm512_reduce_add_epi32(lo_sum);
    for (; c < k; ++c) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(row[c] * inv));
      const int32_t h = (q + 128) >> 8, l = q - h * 256;
      hi[c] = static_cast<int8_t>(h), lo[c] = static_cast<int8_t>(l);
      hs += h, ls += l;
    }
    out.sums[2 * r] = hs, out.sums[2 * r + 1] = ls;
  }
}

inline __m512i BroadcastQuad(const int8_t* p) {  // four int8 activations, to every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// y[R rows, V*16] = rows of x (quantized) . V groups of a weight in quads (`w` at the first group, groups vs bytes
// apart), scaled per row (the activations' step) and per column (the weight's scale).
template <int R, int V>
void QuadTile(const Quantized& q, int64_t r0, int64_t k, const uint8_t* __restrict w, int64_t vs,
              const float* scale, float* __restrict y, int64_t ldy) {
  __m512i acc[R][2 * V];  // per row: V groups against hi, then V against lo
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2 * V; ++u) acc[r][u] = _mm512_setzero_si512();
  const int8_t* xh = q.hi.data() + r0 * k;
  const int8_t* xl = q.lo.data() + r0 * k;
  for (int64_t p = 0; p < k; p += 4) {
    __m512i wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + v * vs + p * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i h = BroadcastQuad(xh + r * k + p);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wv[v], h);
      const __m512i l = BroadcastQuad(xl + r * k + p);
      for (int v = 0; v < V; ++v) acc[r][V + v] = _mm512_dpbusd_epi32(acc[r][V + v], wv[v], l);
    }
  }
  for (int r = 0; r < R; ++r) {
    // sum w * q = 256 * (hi - 128 * sum hi) + (lo - 128 * sum lo): exact in int32 per half, float after
    const int32_t* sums = q.sums.data() + 2 * (r0 + r);
    const __m512i hs = _mm512_set1_epi32(128 * sums[0]), ls = _mm512_set1_epi32(128 * sums[1]);
    const __m512 step = _mm512_set1_ps(q.step[r0 + r]);
    for (int v = 0; v < V; ++v) {
      const __m512 high = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], hs));
      const __m512 low = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][V + v], ls));
      const __m512 sum = _mm512_fmadd_ps(high, _mm512_set1_ps(256.0f), low);
      _mm512_storeu_ps(y + r * ldy + v * 16, _mm512_mul_ps(_mm512_mul_ps(sum, step), _mm512_loadu_ps(scale + v * 16)));
    }
  }
}

// Rows [r0, r0 + rows) against V groups of quads, in tiles of kQuadRows rows (and one row left over).
template <int V>
void QuadTiles(const Quantized& q, int64_t r0, int64_t rows, int64_t k, const uint8_t* w, const float* scale,
               float* y, int64_t ldy) {
  const int64_t vs = k * 16;  // bytes per group of 16 columns
  int64_t r = 0;
  for (; r + kQuadRows <= rows; r += kQuadRows) QuadTile<kQuadRows, V>(q, r0 + r, k, w, vs, scale, y + r * ldy, ldy);
  if (r < rows) QuadTile<1, V>(q, r0 + r, k, w, vs, scale, y + r * ldy, ldy);
}
#else
constexpr bool kQuads = false;
#endif

// Block of a float32 or int8 weight: each depth block of the weight into a float panel (or read in place), then
// every row against it.
template <int V, typename T>
void PanelBlock(const Problem<T>& a, int64_t r0, int64_t rows, int64_t n0, const float* scale, float* y,
                int64_t ldy) {
  alignas(64) static thread_local float panel[kDepth * kPanel];
  for (int64_t k0 = 0; k0 < a.k; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, a.k - k0);
    const T* source = a.layout == kPanelsLayout ? a.w + (n0 * a.k + k0 * 16)
                      : a.layout == kTransposedLayout ? a.w + n0 * a.k + k0
                                                      : a.w + k0 * a.n + n0;
    if constexpr (std::is_same_v<T, float>) {
      if (a.layout == kPanelsLayout) {  // read in place
        Tiles<V>(a.x + r0 * a.k + k0, rows, a.k, source, 16, a.k * 16, kc, y, ldy, k0 == 0);
        continue;
      }
    }
    if (a.layout == kPanelsLayout) {
      PackPanels<V, T>(source, a.k, scale, kc, panel);
    } else if (a.layout == kTransposedLayout) {
      PackTransposed<V, T>(source, a.k, scale, kc, panel);
    } else {
      PackRows<V, T>(source, a.n, scale, kc, panel);
    }
    Tiles<V>(a.x + r0 * a.k + k0, rows, a.k, panel, V * 16, 16, kc, y, ldy, k0 == 0);
  }
}

// One work item: rows [r0, r0 + rows) of x times columns [n0, n0 + V*16) of w, into y [rows, V*16] (row stride
// ldy).
template <int V, typename T>
void Block(const Problem<T>& a, int64_t r0, int64_t rows, int64_t n0, float* y, int64_t ldy) {
  const float* scale = a.scale ? a.scale + n0 : nullptr;  // none for a float weight
  if constexpr (std::is_same_v<T, uint8_t>) {  // quads: the whole depth in registers, no panel
#ifdef __AVX512VNNI__
    QuadTiles<V>(*a.quantized, r0, rows, a.k, a.w + n0 * a.k, scale, y, ldy);
#endif
  } else {
    PanelBlock<V, T>(a, r0, rows, n0, scale, y, ldy);
  }
}

// Per row of y [rows, V*16] (row stride V*16): its largest value and the first column holding it, written to
// best[r * stride] and where[r * stride] (as a column of the whole product, n0 + column).
template <int V>
void RowArgmax(const float* y, int64_t rows, int64_t n0, float* best, int32_t* where, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = y + r * V * 16;
#ifdef __AVX512F__
    __m512 top = _mm512_loadu_ps(row);
    for (int v = 1; v < V; ++v) top = _mm512_max_ps(top, _mm512_loadu_ps(row + v * 16));
    const float value = _mm512_reduce_max_ps(top);
    int column = 0;
    for (int v = 0; v < V; ++v) {
      const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v * 16), _mm512_set1_ps(value), _CMP_EQ_OQ);
      if (hit) {
        column = v * 16 + __builtin_ctz(hit);
        break;
      }
    }
#else
    float value = row[0];
    int column = 0;
    for (int c = 1; c < V * 16; ++c)
      if (row[c] > value) value = row[c], column = c;
#endif
    best[r * stride] = value;
    where[r * stride] = static_cast<int32_t>(n0 + column);
  }
}

// Calls body(r0, rows, n0, std::integral_constant<int, V>) for every work item, on XLA's intra-op threads: V, the
// item's 16-float vectors of columns (3, or fewer in the last panel), as a compile-time size for Block.
template <typename T, typename Body>
void ForEachItem(ffi::ThreadPool& threads, const Problem<T>& a, Body body) {
  const int64_t panels = (a.n + kPanel - 1) / kPanel, chunks = (a.m + kChunk - 1) / kChunk;
  batchgen::ParallelFor(threads, panels * chunks, [&](int64_t i) {
    const int64_t r0 = (i / panels) * kChunk, rows = std::min(kChunk, a.m - r0), n0 = (i % panels) * kPanel;
    switch (std::min<int64_t>(kPanel, a.n - n0) / 16) {
      case 3: return body(r0, rows, n0, std::integral_constant<int, 3>{});
      case 2: return body(r0, rows, n0, std::integral_constant<int, 2>{});
      default: return body(r0, rows, n0, std::integral_constant<int, 1>{});
    }
  });
}

// For a weight in quads: x rounded per row (`Quantize`), once per call, before the work items read it.
template <typename T>
ffi::Error PrepareQuads(Problem<T>& a) {
  if constexpr (std::is_same_v<T, uint8_t>) {
#ifdef __AVX512VNNI__
    if (a.layout != kQuadsLayout || a.k % 4 != 0)
      return ffi::Error::InvalidArgument("a uint8 weight must be in quads, [N / 16, K / 4, 16, 4] with K % 4 == 0");
    static thread_local Quantized quantized;  // kept between calls: no allocation once it has grown
    Quantize(a.x, a.m, a.k, quantized);
    a.quantized = &quantized;
#else
    return ffi::Error::InvalidArgument("int8 weights in quads need a build with AVX512-VNNI");
#endif
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Matmul(ffi::ThreadPool& threads, const float* x, const std::array<int64_t, 2>& x_dims, const T* w,
                  int64_t w_count, const float* scale, int64_t n, float* y, int64_t y_count, Layout layout) {
  Problem<T> a{x, w, scale, y, x_dims[0], x_dims[1], n, layout};
  if (a.n % 16 != 0 || a.k * a.n != w_count || a.m * a.n != y_count)
    return ffi::Error::InvalidArgument("shapes do not give x [M, K] . w [K, N] with N whole 16-float vectors");
  if (ffi::Error error = PrepareQuads(a); error.failure()) return error;
  ForEachItem(threads, a, [&](int64_t r0, int64_t rows, int64_t n0, auto vectors) {
    Block<vectors, T>(a, r0, rows, n0, a.y + r0 * a.n + n0, a.n);
  });
  return ffi::Error::Success();
}

// best [M, P] and where [M, P] (P = N / 48 panels, rounded up): each panel's largest value of each row of the
// product, and its first column.
template <typename T>
ffi::Error MatmulArgmax(ffi::ThreadPool& threads, const float* x, const std::array<int64_t, 2>& x_dims, const T* w,
                        int64_t w_count, const float* scale, int64_t n, float* best, int32_t* where,
                        int64_t best_count, Layout layout) {
  Problem<T> a{x, w, scale, nullptr, x_dims[0], x_dims[1], n, layout};
  const int64_t panels = (a.n + kPanel - 1) / kPanel;
  if (a.n % 16 != 0 || a.k * a.n != w_count || a.m * panels != best_count)
    return ffi::Error::InvalidArgument("shapes do not give x [M, K] . w [K, N] with N whole 16-float vectors");
  if (ffi::Error error = PrepareQuads(a); error.failure()) return error;
  ForEachItem(threads, a, [&](int64_t r0, int64_t rows, int64_t n0, auto vectors) {
    alignas(64) static thread_local float tile[kChunk * kPanel];  // this item's [rows, V*16] of the product
    const int64_t at = r0 * panels + n0 / kPanel;
    Block<vectors, T>(a, r0, rows, n0, tile, vectors * 16);
    RowArgmax<vectors>(tile, rows, n0, best + at, where + at, panels);
  });
  return ffi::Error::Success();
}

// x [M, K] times an int8 weight with one scale per column: W = S8 ([K, N], [N, K] or panels), or U8 (quads).
template <ffi::DataType W, typename T>
ffi::Error ScaledMatmul(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<W> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t layout) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  return Matmul<T>(threads, x.typed_data(), {dims[0], dims[1]}, w.typed_data(), w.element_count(),
                   scale.typed_data(), scale.element_count(), y->typed_data(), y->element_count(), AsLayout(layout));
}

ffi::Error F32Matmul(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y, int32_t layout) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  const int64_t n = w.element_count() / std::max<int64_t>(dims[1], 1);
  return Matmul<float>(threads, x.typed_data(), {dims[0], dims[1]}, w.typed_data(), w.element_count(), nullptr, n,
                       y->typed_data(), y->element_count(), AsLayout(layout));
}

template <ffi::DataType W, typename T>
ffi::Error ScaledMatmulArgmax(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<W> w,
                              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> best,
                              ffi::ResultBuffer<ffi::S32> where, int32_t layout) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  return MatmulArgmax<T>(threads, x.typed_data(), {dims[0], dims[1]}, w.typed_data(), w.element_count(),
                         scale.typed_data(), scale.element_count(), best->typed_data(), where->typed_data(),
                         best->element_count(), AsLayout(layout));
}

ffi::Error F32MatmulArgmax(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> best, ffi::ResultBuffer<ffi::S32> where, int32_t layout) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  const int64_t n = w.element_count() / std::max<int64_t>(dims[1], 1);
  return MatmulArgmax<float>(threads, x.typed_data(), {dims[0], dims[1]}, w.typed_data(), w.element_count(), nullptr,
                             n, best->typed_data(), where->typed_data(), best->element_count(),
                             AsLayout(layout));
}

// One layer of stacked weights: w [L, ...] (any of the layouts above, per layer), with scale [L, N] for int8,
// `layer` a scalar: the product with w[layer], read where it lies. Inside prefill's and scoring's loop over layers
// XLA copied each layer's slice of every stacked weight before the product read it (~0.8 s of the main benchmark
// workload's 9.6 s of prefill).
template <typename T>
ffi::Error LayerMatmul(ffi::ThreadPool& threads, ffi::Buffer<ffi::F32>& x, const T* w, int64_t w_count,
                       const float* scale, ffi::Buffer<ffi::S32>& layer, ffi::ResultBuffer<ffi::F32>& y,
                       int32_t layout, int32_t layers) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  const int64_t l = layer.typed_data()[0];
  if (layers < 1 || l < 0 || l >= layers || w_count % layers != 0)
    return ffi::Error::InvalidArgument("the layer must index a weight stacked [L, ...]");
  const int64_t per_layer = w_count / layers, n = per_layer / std::max<int64_t>(dims[1], 1);
  return Matmul<T>(threads, x.typed_data(), {dims[0], dims[1]}, w + l * per_layer, per_layer,
                   scale == nullptr ? nullptr : scale + l * n, n, y->typed_data(), y->element_count(),
                   AsLayout(layout));
}

ffi::Error F32LayerMatmul(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t layout, int32_t layers) {
  return LayerMatmul<float>(threads, x, w.typed_data(), w.element_count(), nullptr, layer, y, layout, layers);
}

template <ffi::DataType W, typename T>
ffi::Error ScaledLayerMatmul(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<W> w,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y,
                             int32_t layout, int32_t layers) {
  if (scale.element_count() * std::max<int64_t>(x.dimensions().back(), 1) != w.element_count())
    return ffi::Error::InvalidArgument("scale must be [L, N] for w [L, K, N]");
  return LayerMatmul<T>(threads, x, w.typed_data(), w.element_count(), scale.typed_data(), layer, y, layout, layers);
}

constexpr auto Int8Matmul = ScaledMatmul<ffi::S8, int8_t>;
constexpr auto QuadsMatmul = ScaledMatmul<ffi::U8, uint8_t>;
constexpr auto Int8MatmulArgmax = ScaledMatmulArgmax<ffi::S8, int8_t>;
constexpr auto QuadsMatmulArgmax = ScaledMatmulArgmax<ffi::U8, uint8_t>;

// The bindings of the scaled handlers: x, w (of type W), scale -> y, or (`argmax`) -> (best, where).
template <ffi::DataType W, bool argmax = false>
auto ScaledBinding() {
  auto bound = ffi::Ffi::Bind()
                   .Ctx<ffi::ThreadPool>()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Arg<ffi::Buffer<W>>()
                   .template Arg<ffi::Buffer<ffi::F32>>()
                   .template Ret<ffi::Buffer<ffi::F32>>();
  if constexpr (argmax) {
    return std::move(bound).template Ret<ffi::Buffer<ffi::S32>>().template Attr<int32_t>("layout");
  } else {
    return std::move(bound).template Attr<int32_t>("layout");
  }
}

// The bindings of a stacked weight's layer: x, w [L, ...] (of type W), (scale [L, N],) layer -> y.
template <ffi::DataType W>
auto LayerBinding() {
  auto bound = ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<W>>();
  if constexpr (W == ffi::F32) {
    return std::move(bound).template Arg<ffi::Buffer<ffi::S32>>().template Ret<ffi::Buffer<ffi::F32>>()
        .template Attr<int32_t>("layout").template Attr<int32_t>("layers");
  } else {
    return std::move(bound).template Arg<ffi::Buffer<ffi::F32>>().template Arg<ffi::Buffer<ffi::S32>>()
        .template Ret<ffi::Buffer<ffi::F32>>().template Attr<int32_t>("layout").template Attr<int32_t>("layers");
  }
}

}  // namespace

// Floats per vector register of this build (16 with AVX-512, 8 with AVX2): the Python side picks XLA's product
// over the kernel's where it measured XLA faster for this width (`cpu_matmul.AVX2_MAX_ROWS`).
extern "C" int32_t BatchgenMatmulLanes() { return kLanes; }

// 1 when this build multiplies int8 weights in quads (AVX512-VNNI): the engine then stores its int8 decode weights
// that way (`model.kernels.panels`).
extern "C" int32_t BatchgenMatmulQuads() { return kQuads ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenQuadsMatmul, QuadsMatmul, ScaledBinding<ffi::U8>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenQuadsMatmulArgmax, QuadsMatmulArgmax, (ScaledBinding<ffi::U8, true>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenInt8MatmulArgmax, Int8MatmulArgmax, (ScaledBinding<ffi::S8, true>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenF32MatmulArgmax, F32MatmulArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenInt8Matmul, Int8Matmul, ScaledBinding<ffi::S8>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenF32LayerMatmul, F32LayerMatmul, LayerBinding<ffi::F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenInt8LayerMatmul, (ScaledLayerMatmul<ffi::S8, int8_t>), LayerBinding<ffi::S8>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenQuadsLayerMatmul, (ScaledLayerMatmul<ffi::U8, uint8_t>), LayerBinding<ffi::U8>());
