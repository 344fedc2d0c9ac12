// Decode attention over the paged KV cache on CPU: one new query token per slot against that slot's own pages.
//
// The XLA formulation (model/paged_attention.py) scores every page of the pool in one vectorised pass and runs
// its small per-page products as batched dots on one core. This kernel walks each slot's row of the page table
// instead, so it reads only the pages of the rows in the call, and spreads the (slot, KV head) pairs over the
// threads of XLA's intra-op pool: the pass is bound by memory reads, which two cores do at ~1.7x one core's rate.
// Numerics: the same split softmax (per page: largest score, sum of exponentials, weighted values), float32
// throughout, so it matches the XLA path to float32 rounding.
//
// Arguments: q [B, K, G, D] (scaled by D^-0.5), lengths [B] (each slot's positions 0..lengths[b] are visible),
// table [B, W] (each slot's pages in position order; an id >= the pool's pages ends the row), then the pool's
// chunks: keys k_0..k_{C-1} [n_c, K, D, P] and values v_0..v_{C-1} [n_c, K, P, D], page ids running across
// the chunks. Result: [B, K, G, D]; a slot that sees nothing gets zeros.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The running maximum before any page: finite, as the build's -ffast-math assumes; exp(kMasked - x) is 0.
constexpr float kMasked = -1e30f;

struct Pool {
  std::vector<const float*> keys, values;  // per chunk
  std::vector<int64_t> first;              // first page id of each chunk, then the total
  int64_t heads, dim, page;                // K, D, P
};

// Where page `id` of the pool starts for KV head `head`: its keys [D, P] and its values [P, D].
inline void PagePointers(const Pool& pool, int64_t id, int64_t head, const float** keys, const float** values) {
  const int64_t c = std::upper_bound(pool.first.begin(), pool.first.end(), id) - pool.first.begin() - 1;
  const int64_t entry = (id - pool.first[c]) * pool.heads + head;
  *keys = pool.keys[c] + entry * pool.dim * pool.page;
  *values = pool.values[c] + entry * pool.page * pool.dim;
}

// Attention of one slot's G queries of KV head `head` over its pages, into out [G, D]: per page, scores
// [G, D] x [D, P], then the page's weights folded into each query's running (maximum, sum, weighted values).
// G, P and D are compile-time sizes; with AVX-512 the scores (G x P/16 vectors) and the accumulators (G x D/16)
// live in the 32 vector registers, which a plain loop nest does not get from the compiler.
template <int G, int P, int D>
void AttendOne(const Pool& pool, int64_t head, const float* __restrict q, int64_t length, const int32_t* pages,
               int64_t width, float* __restrict out) {
  static_assert(P % 16 == 0 && D % 16 == 0, "pages and heads in whole 16-float vectors");
  constexpr int PV = P / 16, DV = D / 16;
  alignas(64) float weights[G][P];
  float top[G], total[G] = {};
  for (int g = 0; g < G; ++g) top[g] = kMasked;
#ifdef __AVX512F__
  __m512 acc[G][DV];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_setzero_ps();
#else
  float acc[G][D] = {};
#endif
  for (int64_t j = 0; j < width; ++j) {
    const int64_t id = pages[j], visible = std::min<int64_t>(P, length + 1 - j * P);
    if (id < 0 || id >= pool.first.back() || visible <= 0) break;
    const float* keys;    // [D, P]
    const float* values;  // [P, D]
    PagePointers(pool, id, head, &keys, &values);
#ifdef __AVX512F__
    __m512 scores[G][PV];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < PV; ++i) scores[g][i] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      __m512 row[PV];
      for (int i = 0; i < PV; ++i) row[i] = _mm512_loadu_ps(keys + d * P + 16 * i);
      for (int g = 0; g < G; ++g) {
        const __m512 qd = _mm512_set1_ps(q[g * D + d]);
        for (int i = 0; i < PV; ++i) scores[g][i] = _mm512_fmadd_ps(qd, row[i], scores[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < PV; ++i) _mm512_store_ps(&weights[g][16 * i], scores[g][i]);
#else
    for (int g = 0; g < G; ++g)
      for (int p = 0; p < P; ++p) {
        float sum = 0.0f;
        for (int d = 0; d < D; ++d) sum += q[g * D + d] * keys[d * P + p];
        weights[g][p] = sum;
      }
#endif
    float rescale[G];
    for (int g = 0; g < G; ++g) {
      float* w = weights[g];
      float page_top = kMasked;
      for (int p = 0; p < P; ++p) page_top = std::max(page_top, p < visible ? w[p] : kMasked);
      const float new_top = std::max(top[g], page_top);
      rescale[g] = std::exp(top[g] - new_top);  // 0 for the first page (top was kMasked)
      float sum = 0.0f;
      for (int p = 0; p < P; ++p) sum += (w[p] = p < visible ? std::exp(w[p] - new_top) : 0.0f);
      total[g] = total[g] * rescale[g] + sum;
      top[g] = new_top;
    }
#ifdef __AVX512F__
    for (int g = 0; g < G; ++g) {
      const __m512 r = _mm512_set1_ps(rescale[g]);
      for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], r);
    }
    for (int64_t p = 0; p < visible; ++p) {
      __m512 row[DV];
      for (int i = 0; i < DV; ++i) row[i] = _mm512_loadu_ps(values + p * D + 16 * i);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(weights[g][p]);
        for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_fmadd_ps(w, row[i], acc[g][i]);
      }
    }
#else
    for (int g = 0; g < G; ++g) {
      for (int d = 0; d < D; ++d) acc[g][d] *= rescale[g];
      for (int64_t p = 0; p < visible; ++p)
        for (int d = 0; d < D; ++d) acc[g][d] += weights[g][p] * values[p * D + d];
    }
#endif
  }
  for (int g = 0; g < G; ++g) {
    const float inverse = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
#ifdef __AVX512F__
    const __m512 scale = _mm512_set1_ps(inverse);
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(out + g * D + 16 * i, _mm512_mul_ps(acc[g][i], scale));
#else
    for (int d = 0; d < D; ++d) out[g * D + d] = acc[g][d] * inverse;
#endif
  }
}

using AttendFn = void (*)(const Pool&, int64_t, const float*, int64_t, const int32_t*, int64_t, float*);

// The instantiation for (G, P, D); nullptr for sizes not built (the Python side then keeps XLA's attention).
template <int G>
AttendFn ForGroups(int64_t page, int64_t dim) {
  if (page == 32 && dim == 64) return AttendOne<G, 32, 64>;
  if (page == 32 && dim == 128) return AttendOne<G, 32, 128>;
  return nullptr;
}

AttendFn Select(int64_t groups, int64_t page, int64_t dim) {
  switch (groups) {
    case 1: return ForGroups<1>(page, dim);
    case 2: return ForGroups<2>(page, dim);
    case 3: return ForGroups<3>(page, dim);
    case 4: return ForGroups<4>(page, dim);
    case 5: return ForGroups<5>(page, dim);
    case 6: return ForGroups<6>(page, dim);
    case 7: return ForGroups<7>(page, dim);
    case 8: return ForGroups<8>(page, dim);
    default: return nullptr;
  }
}

ffi::Error PagedAttention(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lengths,
                          ffi::Buffer<ffi::S32> table, ffi::RemainingArgs chunks, ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions();  // [B, K, G, D]
  const int64_t slots = q_dims[0], heads = q_dims[1], groups = q_dims[2], dim = q_dims[3];
  const int64_t width = table.dimensions()[1];
  if (chunks.size() % 2 != 0) return ffi::Error::InvalidArgument("expected keys and values for every chunk");
  Pool pool;
  pool.heads = heads;
  pool.dim = dim;
  pool.first.push_back(0);
  const size_t count = chunks.size() / 2;
  for (size_t c = 0; c < count; ++c) {
    auto k = chunks.get<ffi::Buffer<ffi::F32>>(c);
    auto v = chunks.get<ffi::Buffer<ffi::F32>>(count + c);
    if (!k.has_value() || !v.has_value()) return ffi::Error::InvalidArgument("pool chunks must be float32");
    const auto k_dims = k->dimensions();  // [n, K, D, P]
    pool.page = k_dims[3];
    pool.keys.push_back(k->typed_data());
    pool.values.push_back(v->typed_data());
    pool.first.push_back(pool.first.back() + k_dims[0]);
  }
  const AttendFn attend = Select(groups, pool.page, dim);
  if (attend == nullptr) return ffi::Error::InvalidArgument("no kernel built for these head and page sizes");
  const float* q_data = q.typed_data();
  const int32_t* length_data = lengths.typed_data();
  const int32_t* table_data = table.typed_data();
  float* out_data = out->typed_data();
  batchgen::ParallelFor(threads, slots * heads, [&](int64_t i) {
    const int64_t b = i / heads;
    attend(pool, i % heads, q_data + i * groups * dim, length_data[b], table_data + b * width, width,
           out_data + i * groups * dim);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
