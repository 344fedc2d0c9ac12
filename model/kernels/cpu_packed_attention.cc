// Prefill's (and scoring's) causal attention of packed prompts on CPU: each token against the keys of its own
// prompt up to itself, and the cached context keys it continues (prompt sharing), and nothing else.
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
// Prompt sharing (model/generation/prefix_cache.py): a prompt may continue cached pages, whose keys come first in
// its softmax. The call's context keys are laid out like its own keys, and a mask says which of them each token
// sees (its own pages, and of the page where it parts from the cached prompt only the common first positions).
// Key blocks no row of a work item sees are skipped, so a token pays for its own context only.
//
// Arguments: q [N, K, G, D] (scaled by D^-0.5; N = rows x tokens, the rows of a call one after another), keys
// [K, D, N + 16] (transposed: a block of keys' d-th entries lie together; 16 columns of padding so a block's
// load never runs past the end), values [K, N, D], starts [N] int32: the first key token n sees (its prompt's
// first token); it sees keys starts[n] .. n, none when starts[n] > n (padding). Then the context (S keys, S = 0
// without one): context_keys [K, D, S + 16], context_values [K, S, D], context_visible [N, S] uint8 (nonzero:
// token n sees context key s). Result: [N, K, G, D]; a token that sees no key gets zeros.

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
  const float *context_keys, *context_values;
  const uint8_t* context_visible;
  float* out;
  int64_t tokens, heads, groups, dim, stride;  // stride: a row of `keys`, tokens + padding
  int64_t context, context_stride;             // S, and a row of `context_keys`: S + padding
};

// Folds one block of a row's scores w [kLanes] into its running (maximum, sum, weighted values): keys j of the
// block in [begin, end) for which sees(j) holds count; `values` is the block's first key's value [D].
template <int D, typename Sees>
inline void Fold(float* w, int64_t begin, int64_t end, Sees sees, const float* values, float* top, float* total,
                 float* acc) {
  constexpr int DV = D / kLanes;
  float block_top = kMasked;
  for (int j = 0; j < kLanes; ++j) block_top = std::max(block_top, j >= begin && j < end && sees(j) ? w[j] : kMasked);
  const float new_top = std::max(*top, block_top);
  const float rescale = std::exp(*top - new_top);  // 0 for the row's first block (top was kMasked)
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += (w[j] = j >= begin && j < end && sees(j) ? std::exp(w[j] - new_top) : 0.0f);
  *total = *total * rescale + sum;
  *top = new_top;
  Vec row_acc[DV];
  const Vec r_scale = batchgen::Broadcast(rescale);
  for (int i = 0; i < DV; ++i) row_acc[i] = batchgen::Mul(batchgen::Load(acc + i * kLanes), r_scale);
  for (int64_t j = begin; j < end; ++j) {
    if (!sees(j)) continue;  // a masked key adds nothing (and its value is never read)
    const Vec p = batchgen::Broadcast(w[j]);
    const float* value = values + j * D;
    for (int i = 0; i < DV; ++i) row_acc[i] = batchgen::Fma(p, batchgen::Load(value + i * kLanes), row_acc[i]);
  }
  for (int i = 0; i < DV; ++i) batchgen::Store(acc + i * kLanes, row_acc[i]);
}

// Scores of R query rows against keys kb .. kb + kLanes - 1 of transposed keys [D, stride], into weights.
template <int R, int D>
inline void Scores(const float* const* q_row, const float* keys, int64_t stride, int64_t kb,
                   float (*weights)[kLanes]) {
  Vec scores[R];
  for (int r = 0; r < R; ++r) scores[r] = batchgen::Zero();
  for (int d = 0; d < D; ++d) {
    const Vec key = batchgen::Load(keys + d * stride + kb);
    for (int r = 0; r < R; ++r) scores[r] = batchgen::Fma(batchgen::Broadcast(q_row[r][d]), key, scores[r]);
  }
  for (int r = 0; r < R; ++r) batchgen::Store(weights[r], scores[r]);
}

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
  constexpr int QB = QueriesPerItem<G>(), R = G * QB;
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
  // The context first: each row's mask, none for a repeated row.
  const uint8_t* sees_row[R];
  for (int r = 0; r < R; ++r) sees_row[r] = last[r] >= 0 ? a.context_visible + last[r] * a.context : nullptr;
  const float* context_keys = a.context_keys + head * D * a.context_stride;
  const float* context_values = a.context_values + head * a.context * D;
  for (int64_t kb = 0; kb < a.context; kb += kLanes) {
    const int64_t end = std::min<int64_t>(kLanes, a.context - kb);
    bool any = false;  // whether a row of the item sees a key of this block (most see their own pages only)
    for (int r = 0; r < R && !any; ++r)
      for (int64_t j = 0; j < end && sees_row[r] != nullptr && !any; ++j) any = sees_row[r][kb + j] != 0;
    if (!any) continue;
    Scores<R, D>(q_row, context_keys, a.context_stride, kb, weights);
    for (int r = 0; r < R; ++r) {
      if (sees_row[r] == nullptr) continue;
      const uint8_t* sees = sees_row[r] + kb;
      Fold<D>(weights[r], 0, end, [sees](int64_t j) { return sees[j] != 0; }, context_values + kb * D, &top[r],
              &total[r], acc[r]);
    }
  }
  // Then the row's own prompt: keys first[r] .. last[r].
  const float* keys = a.keys + head * D * a.stride;
  const float* values = a.values + head * a.tokens * D;
  for (int64_t kb = lo; kb <= hi; kb += kLanes) {
    // Scores of every row against keys kb .. kb + kLanes - 1 (past `hi`: padding or other prompts, masked below).
    Scores<R, D>(q_row, keys, a.stride, kb, weights);
    for (int r = 0; r < R; ++r) {
      const int64_t begin = std::max<int64_t>(first[r] - kb, 0), end = std::min<int64_t>(last[r] - kb + 1, kLanes);
      if (begin >= end) continue;  // none of this block's keys is visible to the row
      Fold<D>(weights[r], begin, end, [](int64_t) { return true; }, values + kb * D, &top[r], &total[r], acc[r]);
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
                           ffi::Buffer<ffi::F32> context_keys, ffi::Buffer<ffi::F32> context_values,
                           ffi::Buffer<ffi::U8> context_visible, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = q.dimensions();  // [N, K, G, D]
  if (dims.size() != 4) return ffi::Error::InvalidArgument("q must be [N, K, G, D]");
  const Packed a{q.typed_data(), keys.typed_data(), values.typed_data(), starts.typed_data(),
                 context_keys.typed_data(), context_values.typed_data(), context_visible.typed_data(),
                 out->typed_data(), dims[0], dims[1], dims[2], dims[3], keys.dimensions().back(),
                 context_values.dimensions().size() == 3 ? context_values.dimensions()[1] : -1,
                 context_keys.dimensions().back()};
  if (a.stride < a.tokens + kLanes || keys.element_count() != a.heads * a.dim * a.stride)
    return ffi::Error::InvalidArgument("keys must be [K, D, N + 16]");
  if (values.element_count() != a.tokens * a.heads * a.dim || starts.element_count() != a.tokens)
    return ffi::Error::InvalidArgument("values must be [K, N, D] and starts [N]");
  if (a.context < 0 || context_values.element_count() != a.heads * a.context * a.dim ||
      a.context_stride < a.context + kLanes || context_keys.element_count() != a.heads * a.dim * a.context_stride ||
      context_visible.element_count() != a.tokens * a.context)
    return ffi::Error::InvalidArgument("the context must be keys [K, D, S + 16], values [K, S, D], visible [N, S]");
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
