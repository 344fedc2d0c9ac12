// The paged KV pool as the CPU kernels see it: its chunks, where a page's entries lie, and how an entry is
// written. Shared by the decode-attention kernel (which writes each step's new entries) and the cache kernel
// (prefill's writes and page copies), so both write the same bits.
//
// Layout (model/generation/paged_cache.py): the pool is split into chunks of pages, page ids running across
// them; keys are [n, K, D, P] (positions last), values [n, K, P, D]. Elements are float32 or bfloat16.

#ifndef BATCHGEN_KERNELS_CPU_PAGED_POOL_H_
#define BATCHGEN_KERNELS_CPU_PAGED_POOL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace batchgen {

// A bfloat16 value: the high half of a float32.
struct BFloat16 {
  uint16_t bits;
};

inline float ToFloat(float x) { return x; }
inline float ToFloat(BFloat16 x) {
  const uint32_t bits = uint32_t{x.bits} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename E>
E FromFloat(float x);
template <>
inline float FromFloat<float>(float x) { return x; }
template <>
inline BFloat16 FromFloat<BFloat16>(float x) {  // round to nearest even, as XLA converts (no NaNs here)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return BFloat16{static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)};
}

template <typename E>
struct Pool {
  std::vector<E*> keys, values;  // per chunk
  std::vector<int64_t> first;    // first page id of each chunk, then the total
  int64_t heads = 0, dim = 0, page = 0;  // K, D, P
};

// The pool whose key chunks are rets[0, count) and value chunks rets[count, 2 * count): a kernel's results,
// each aliased to its argument, so writing them updates the pool in place. False when a result is missing.
template <typename E>
bool PoolFromResults(xla::ffi::RemainingRets& rets, size_t count, Pool<E>* pool) {
  pool->first.assign(1, 0);
  for (size_t c = 0; c < count; ++c) {
    auto k = rets.get<xla::ffi::AnyBuffer>(c);
    auto v = rets.get<xla::ffi::AnyBuffer>(count + c);
    if (!k.has_value() || !v.has_value()) return false;
    const auto dims = (*k)->dimensions();  // [n, K, D, P]
    pool->heads = dims[1];
    pool->dim = dims[2];
    pool->page = dims[3];
    pool->keys.push_back(static_cast<E*>((*k)->untyped_data()));
    pool->values.push_back(static_cast<E*>((*v)->untyped_data()));
    pool->first.push_back(pool->first.back() + dims[0]);
  }
  return true;
}

// Where page `id` of the pool starts for KV head `head`: its keys [D, P] and its values [P, D].
template <typename E>
inline void PagePointers(const Pool<E>& pool, int64_t id, int64_t head, E** keys, E** values) {
  const int64_t c = std::upper_bound(pool.first.begin(), pool.first.end(), id) - pool.first.begin() - 1;
  const int64_t entry = (id - pool.first[c]) * pool.heads + head;
  *keys = pool.keys[c] + entry * pool.dim * pool.page;
  *values = pool.values[c] + entry * pool.page * pool.dim;
}

// Writes one token's key and value [D] of KV head `head` at offset `offset` of page `id`.
template <typename E>
void WriteEntry(const Pool<E>& pool, int64_t id, int64_t head, int64_t offset, const float* key, const float* value) {
  E* keys;    // [D, P]
  E* values;  // [P, D]
  PagePointers(pool, id, head, &keys, &values);
  for (int64_t d = 0; d < pool.dim; ++d) {
    keys[d * pool.page + offset] = FromFloat<E>(key[d]);
    values[offset * pool.dim + d] = FromFloat<E>(value[d]);
  }
}

}  // namespace batchgen

#endif  // BATCHGEN_KERNELS_CPU_PAGED_POOL_H_
