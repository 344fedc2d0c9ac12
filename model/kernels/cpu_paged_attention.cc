// Decode attention over the paged KV cache on CPU: each slot's new key and value written into its page, then its
// one new query token against that slot's own pages.
//
// The XLA formulation (model/paged_attention.py) scores every page of the pool in one vectorised pass and runs
// its small per-page products as batched dots on one core. This kernel walks each slot's row of the page table
// instead, so it reads only the pages of the rows in the call, and spreads the (slot, KV head) pairs over the
// threads of XLA's intra-op pool: the pass is bound by memory reads, which two cores do at ~1.7x one core's rate.
// Numerics: the same split softmax (per page: largest score, sum of exponentials, weighted values), float32
// throughout, so it matches the XLA path to float32 rounding. A bfloat16 pool is read as float32 (a shift per
// value) and written rounded to nearest even, as XLA's conversion rounds.
//
// Why the write is here: XLA writes the new entries as a scatter, one element at a time (keys lie positions-
// last, D values P apart), ~10% of the demo model's 64-slot decode step; here each (slot, KV head) work item
// writes its own D keys and D values just before it reads them.
//
// Arguments: q [B, K, G, D] (scaled by D^-0.5), lengths [B] (each slot's new token sits at position lengths[b];
// positions 0..lengths[b] are visible), table [B, W] (each slot's pages in position order; an id >= the pool's
// pages ends the row), new_k and new_v [B, K, D] float32 (the new token's key and value), target [B] (the page
// they go to, at offset lengths[b] % P; an id >= the pool's pages writes nothing: idle slots), then the pool's
// chunks: keys k_0..k_{C-1} [n_c, K, D, P] and values v_0..v_{C-1} [n_c, K, P, D], float32 or bfloat16, page
// ids running across the chunks. Results: [B, K, G, D] (a slot that sees nothing gets zeros), then the chunks,
// each aliased to its argument: the pool is updated in place.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_paged_pool.h"
#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using batchgen::BFloat16;
using batchgen::Pool;
using batchgen::ToFloat;

// The running maximum before any page: finite, as the build's -ffast-math assumes; exp(kMasked - x) is 0.
constexpr float kMasked = -1e30f;

// 16 pool entries as floats.
#ifdef __AVX512F__
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

#ifdef __AVX512F__
// Cache-line prefetches, `count` lines from line `first` of the block at `base` that has `lines` lines.
template <typename E>
inline void PrefetchLines(const E* base, int64_t first, int64_t count, int64_t lines) {
  for (int64_t l = first; l < std::min(first + count, lines); ++l)
    _mm_prefetch(reinterpret_cast<const char*>(base) + 64 * l, _MM_HINT_T0);
}
#endif

// Attention of one slot's G queries of KV head `head` over its pages, into out [G, D]: per page, scores
// [G, D] x [D, P], then the page's weights folded into each query's running (maximum, sum, weighted values).
// G, P and D are compile-time sizes; with AVX-512 the scores (G x P/16 vectors) and the accumulators (G x D/16)
// live in the 32 vector registers, which a plain loop nest does not get from the compiler.
template <int G, int P, int D, typename E>
void AttendOne(const Pool<E>& pool, int64_t head, const float* __restrict q, int64_t length, const int32_t* pages,
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
  // Page j of the row: its keys [D, P] and values [P, D], or null past the row's last visible page.
  auto page_at = [&](int64_t j, E** keys, E** values) {
    *keys = *values = nullptr;
    if (j >= width || pages[j] < 0 || pages[j] >= pool.first.back() || length + 1 - j * P <= 0) return;
    batchgen::PagePointers(pool, pages[j], head, keys, values);
  };
  E *keys, *values, *next_keys, *next_values;
  page_at(0, &keys, &values);
#ifdef __AVX512F__
  // The pass is bound by reading pages scattered over the pool, and the hardware prefetcher stops at every
  // 4 KiB boundary. So page j + 1 is requested while page j is read, a few cache lines per loop iteration: its
  // keys while page j's keys are scored, its values while page j's values are summed; the first page whole.
  constexpr int64_t kLines = int64_t{D} * P * sizeof(E) / 64;  // a page's keys, or its values
  constexpr int64_t kLinesPerD = (kLines + D - 1) / D, kLinesPerP = (kLines + P - 1) / P;
  if (keys != nullptr) {
    PrefetchLines(keys, 0, kLines, kLines);
    PrefetchLines(values, 0, kLines, kLines);
  }
#endif
  for (int64_t j = 0; keys != nullptr; ++j, keys = next_keys, values = next_values) {
    const int64_t visible = std::min<int64_t>(P, length + 1 - j * P);
    page_at(j + 1, &next_keys, &next_values);
#ifdef __AVX512F__
    const bool has_next = next_keys != nullptr;
    __m512 scores[G][PV];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < PV; ++i) scores[g][i] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      if (has_next) PrefetchLines(next_keys, d * kLinesPerD, kLinesPerD, kLines);
      __m512 row[PV];
      for (int i = 0; i < PV; ++i) row[i] = Load16(keys + d * P + 16 * i);
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
        for (int d = 0; d < D; ++d) sum += q[g * D + d] * ToFloat(keys[d * P + p]);
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
      if (has_next) PrefetchLines(next_values, p * kLinesPerP, kLinesPerP, kLines);
      __m512 row[DV];
      for (int i = 0; i < DV; ++i) row[i] = Load16(values + p * D + 16 * i);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(weights[g][p]);
        for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_fmadd_ps(w, row[i], acc[g][i]);
      }
    }
#else
    for (int g = 0; g < G; ++g) {
      for (int d = 0; d < D; ++d) acc[g][d] *= rescale[g];
      for (int64_t p = 0; p < visible; ++p)
        for (int d = 0; d < D; ++d) acc[g][d] += weights[g][p] * ToFloat(values[p * D + d]);
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

template <typename E>
using AttendFn = void (*)(const Pool<E>&, int64_t, const float*, int64_t, const int32_t*, int64_t, float*);

// The instantiation for (G, P, D); nullptr for sizes not built (the Python side then keeps XLA's attention).
template <int G, typename E>
AttendFn<E> ForGroups(int64_t page, int64_t dim) {
  if (page == 32 && dim == 64) return AttendOne<G, 32, 64, E>;
  if (page == 32 && dim == 128) return AttendOne<G, 32, 128, E>;
  return nullptr;
}

template <typename E>
AttendFn<E> Select(int64_t groups, int64_t page, int64_t dim) {
  switch (groups) {
    case 1: return ForGroups<1, E>(page, dim);
    case 2: return ForGroups<2, E>(page, dim);
    case 3: return ForGroups<3, E>(page, dim);
    case 4: return ForGroups<4, E>(page, dim);
    case 5: return ForGroups<5, E>(page, dim);
    case 6: return ForGroups<6, E>(page, dim);
    case 7: return ForGroups<7, E>(page, dim);
    case 8: return ForGroups<8, E>(page, dim);
    default: return nullptr;
  }
}

struct Step {
  const float *q, *new_k, *new_v;
  const int32_t *lengths, *table, *target;
  float* out;
  int64_t slots, heads, groups, dim, width;
};

// The pool's chunks (the results aliased to them: written in place) as element type E.
template <typename E>
ffi::Error WriteAndAttend(ffi::ThreadPool& threads, const Step& a, ffi::RemainingRets& rets, size_t count) {
  Pool<E> pool;
  if (!batchgen::PoolFromResults(rets, count, &pool))
    return ffi::Error::InvalidArgument("expected the pool's chunks as results");
  const AttendFn<E> attend = Select<E>(a.groups, pool.page, a.dim);
  if (attend == nullptr) return ffi::Error::InvalidArgument("no kernel built for these head and page sizes");
  batchgen::ParallelFor(threads, a.slots * a.heads, [&](int64_t i) {
    const int64_t b = i / a.heads, head = i % a.heads, length = a.lengths[b], id = a.target[b];
    if (id >= 0 && id < pool.first.back())  // the slot's own page: no other work item reads or writes it
      batchgen::WriteEntry(pool, id, head, length % pool.page, a.new_k + i * a.dim, a.new_v + i * a.dim);
    attend(pool, head, a.q + i * a.groups * a.dim, length, a.table + b * a.width, a.width,
           a.out + i * a.groups * a.dim);
  });
  return ffi::Error::Success();
}

ffi::Error PagedWriteAttention(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lengths,
                               ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::F32> new_k,
                               ffi::Buffer<ffi::F32> new_v, ffi::Buffer<ffi::S32> target,
                               ffi::RemainingArgs chunks, ffi::ResultBuffer<ffi::F32> out,
                               ffi::RemainingRets written) {
  const auto q_dims = q.dimensions();  // [B, K, G, D]
  const Step a{q.typed_data(), new_k.typed_data(), new_v.typed_data(), lengths.typed_data(), table.typed_data(),
               target.typed_data(), out->typed_data(), q_dims[0], q_dims[1], q_dims[2], q_dims[3],
               table.dimensions()[1]};
  if (chunks.size() % 2 != 0 || written.size() != chunks.size())
    return ffi::Error::InvalidArgument("expected keys and values for every chunk, as arguments and as results");
  if (new_k.element_count() != a.slots * a.heads * a.dim || new_v.element_count() != new_k.element_count())
    return ffi::Error::InvalidArgument("new_k and new_v must be [B, K, D]");
  const size_t count = chunks.size() / 2;
  auto first = chunks.get<ffi::AnyBuffer>(0);
  if (!first.has_value()) return ffi::Error::InvalidArgument("expected the pool's chunks");
  switch (first->element_type()) {
    case ffi::DataType::F32: return WriteAndAttend<float>(threads, a, written, count);
    case ffi::DataType::BF16: return WriteAndAttend<BFloat16>(threads, a, written, count);
    default: return ffi::Error::InvalidArgument("pool chunks must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenPagedWriteAttention, PagedWriteAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());
