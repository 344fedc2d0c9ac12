// Prefill's (and scoring's) causal attention of packed prompts on CPU: each token against the keys of its own
// prompt up to itself, and nothing else.
//
// XLA's formulation (model/transformer.py `_self_attention`) scores a packed row as dense blocks of queries x keys
// and masks what a token may not see: a 512-token row of two 256-token prompts computes 10 of its 16 causal blocks
// where 6 hold every visible score, and its products with a 64-wide inner dimension run well below the matmul
// rate. On the demo model's main benchmark workload that attention was ~18% of prefill's op time for ~3% of its
// FLOPs. Here each work item is a block of consecutive queries of one KV head (all G query heads of it: the rows
// share every key they read) and walks only the keys from its first token's prompt start to its last token,
// flash-style: per block of kLanes keys, scores in registers, then each row's running (maximum, sum, weighted
// values). Numerics: float32 throughout, the same softmax up to the order of the sums (~1e-6 relative).
//
// Arguments: q [N, K, G, D] (scaled by D^-0.5; N = rows x tokens, the rows of a call one after another), keys
// [K, D, N + 16] (transposed: a block of keys' d-th entries lie together; 16 columns of padding so a block's
// load never runs past the end), values [K, N, D], starts [N] int32: the first key token n sees (its prompt's
// first token); it sees keys starts[n] .. n, none when starts[n] > n (padding). Result: [N, K, G, D]; a token
// that sees no key gets zeros.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_parallel.h"
#include "cpu_vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using batchgen::kLanes;
using batchgen::Vec;

// The running maximum before any key: finite, as the build's -ffast-math assumes; exp(kMasked - x) is 0.
constexpr float kMasked = -1e30f;

struct Packed {
  const float *q, *keys, *values;
  const int32_t* starts;
  float* out;
  int64_t tokens, heads, groups, dim, stride;  // stride: a row of `keys`, tokens + padding
};

// Query tokens per work item for G query heads per KV head: its G x QB score rows stay in vector registers
// while a key block's D entries stream past them (24 of AVX-512's 32 registers, 12 of AVX2's 16).
template <int G>
constexpr int QueriesPerItem() {
  constexpr int rows = kLanes == 16 ? 24 : 12;
  return rows / G > 0 ? rows / G : 1;
}

// Attention of tokens [t0, t0 + QB) (fewer at the end) for KV head `head` and its G query heads.
template <int G, int D>
void AttendBlock(const Packed& a, int64_t head, int64_t t0) {
  constexpr int QB = QueriesPerItem<G>(), R = G * QB, DV = D / kLanes;
  static_assert(D % kLanes == 0, "heads in whole vectors");
  const int64_t count = std::min<int64_t>(QB, a.tokens - t0);
  const float* q_row[R];
  int64_t first[R], last[R];  // each row's visible keys
  int64_t lo = a.tokens, hi = -1;
  for (int r = 0; r < R; ++r) {
    const int64_t i = std::min<int64_t>(r / G, count - 1), t = t0 + i;  // rows past the end repeat the last token
    q_row[r] = a.q + ((t * a.heads + head) * G + r % G) * D;
    first[r] = a.starts[t];
    last[r] = r / G < count ? t : -1;  // a repeated row sees nothing
    if (first[r] <= last[r]) lo = std::min(lo, first[r]), hi = std::max(hi, last[r]);
  }
  alignas(64) float acc[R][D] = {};
  alignas(64) float weights[R][kLanes];
  float top[R], total[R] = {};
  for (int r = 0; r < R; ++r) top[r] = kMasked;
  const float* keys = a.keys + head * D * a.stride;
  const float* values = a.values + head * a.tokens * D;
  for (int64_t kb = lo; kb <= hi; kb += kLanes) {
    // Scores of every row against keys kb .. kb + kLanes - 1 (past `hi`: padding or other prompts, masked below).
    Vec scores[R];
    for (int r = 0; r < R; ++r) scores[r] = batchgen::Zero();
    for (int d = 0; d < D; ++d) {
      const Vec key = batchgen::Load(keys + d * a.stride + kb);
      for (int r = 0; r < R; ++r) scores[r] = batchgen::Fma(batchgen::Broadcast(q_row[r][d]), key, scores[r]);
    }
    for (int r = 0; r < R; ++r) batchgen::Store(weights[r], scores[r]);
    for (int r = 0; r < R; ++r) {
      const int64_t begin = std::max<int64_t>(first[r] - kb, 0), end = std::min<int64_t>(last[r] - kb + 1, kLanes);
      if (begin >= end) continue;  // none of this block's keys is visible to the row
      float* w = weights[r];
      float block_top = kMasked;
      for (int j = 0; j < kLanes; ++j) block_top = std::max(block_top, j >= begin && j < end ? w[j] : kMasked);
      const float new_top = std::max(top[r], block_top);
      const float rescale = std::exp(top[r] - new_top);  // 0 for the row's first block (top was kMasked)
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += (w[j] = j >= begin && j < end ? std::exp(w[j] - new_top) : 0.0f);
      total[r] = total[r] * rescale + sum;
      top[r] = new_top;
      Vec row_acc[DV];
      const Vec r_scale = batchgen::Broadcast(rescale);
      for (int i = 0; i < DV; ++i) row_acc[i] = batchgen::Mul(batchgen::Load(acc[r] + i * kLanes), r_scale);
      for (int64_t j = begin; j < end; ++j) {
        const Vec p = batchgen::Broadcast(w[j]);
        const float* value = values + (kb + j) * D;
        for (int i = 0; i < DV; ++i) row_acc[i] = batchgen::Fma(p, batchgen::Load(value + i * kLanes), row_acc[i]);
      }
      for (int i = 0; i < DV; ++i) batchgen::Store(acc[r] + i * kLanes, row_acc[i]);
    }
  }
  for (int r = 0; r < R && r / G < count; ++r) {
    const float inverse = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;
    float* out = a.out + (((t0 + r / G) * a.heads + head) * G + r % G) * D;
    for (int d = 0; d < D; ++d) out[d] = acc[r][d] * inverse;
  }
}

using AttendFn = void (*)(const Packed&, int64_t, int64_t);

template <int G>
std::pair<AttendFn, int> ForGroups(int64_t dim) {
  if (dim == 64) return {AttendBlock<G, 64>, QueriesPerItem<G>()};
  if (dim == 128) return {AttendBlock<G, 128>, QueriesPerItem<G>()};
  return {nullptr, 0};
}

// The instantiation for (G, D) and its query tokens per work item; nullptr for sizes not built (the Python side
// then keeps XLA's attention).
std::pair<AttendFn, int> Select(int64_t groups, int64_t dim) {
  switch (groups) {
    case 1: return ForGroups<1>(dim);
    case 2: return ForGroups<2>(dim);
    case 3: return ForGroups<3>(dim);
    case 4: return ForGroups<4>(dim);
    case 5: return ForGroups<5>(dim);
    case 6: return ForGroups<6>(dim);
    case 7: return ForGroups<7>(dim);
    case 8: return ForGroups<8>(dim);
    default: return {nullptr, 0};
  }
}

ffi::Error PackedAttention(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> starts,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = q.dimensions();  // [N, K, G, D]
  if (dims.size() != 4) return ffi::Error::InvalidArgument("q must be [N, K, G, D]");
  const Packed a{q.typed_data(), keys.typed_data(), values.typed_data(), starts.typed_data(), out->typed_data(),
                 dims[0], dims[1], dims[2], dims[3], keys.dimensions().back()};
  if (a.stride < a.tokens + kLanes || keys.element_count() != a.heads * a.dim * a.stride)
    return ffi::Error::InvalidArgument("keys must be [K, D, N + 16]");
  if (values.element_count() != a.tokens * a.heads * a.dim || starts.element_count() != a.tokens)
    return ffi::Error::InvalidArgument("values must be [K, N, D] and starts [N]");
  const auto [attend, per_item] = Select(a.groups, a.dim);
  if (attend == nullptr) return ffi::Error::InvalidArgument("no kernel built for this head size and grouping");
  const int64_t blocks = (a.tokens + per_item - 1) / per_item;
  // Later query blocks see more keys: handed out last first, so the long items start early and the short ones
  // fill in at the end.
  batchgen::ParallelFor(threads, blocks * a.heads, [&, attend = attend, per_item = per_item](int64_t i) {
    const int64_t block = blocks - 1 - i / a.heads;
    attend(a, i % a.heads, block * per_item);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenPackedAttention, PackedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
