// Writes into the paged KV pool on CPU, in place: prefill's new keys and values, and copies of whole pages.
//
// Why a kernel: XLA's CPU backend has no bfloat16 scatter. It converts the whole pool to float32, scatters there
// and converts it all back, for every layer's keys and values of every call: for a bfloat16 cache of the demo
// model, prefill of the main benchmark workload took 10.8 s against 6.0 s over a float32 pool, and one prefix
// copy 0.67 s against 0.02 s. Here a call touches only the entries it writes. A float32 pool takes the same path
// (XLA's float32 scatter is already in place; one path on CPU keeps both pool types tested alike).
//
// BatchgenPagedWrite: new_k and new_v [X, K, D] float32, pages [X] and offsets [X] int32 (token x goes to
// offset offsets[x] of page pages[x]; a page id outside the pool writes nothing: padding), then the pool's key
// chunks and value chunks (cpu_paged_pool.h); results: the chunks, each aliased to its argument.
//
// BatchgenPagedCopy: source [M] and target [M] int32, then one layer's key chunks or value chunks (any element
// type: pages are copied as bytes); page source[m] is copied onto page target[m], a target outside the pool is
// skipped. Every source is read before any target is written, as XLA's gather-then-scatter reads them.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_paged_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename E>
ffi::Error WriteTokens(const float* new_k, const float* new_v, const int32_t* pages, const int32_t* offsets,
                       int64_t tokens, ffi::RemainingRets& rets, size_t count) {
  batchgen::Pool<E> pool;
  if (!batchgen::PoolFromResults(rets, count, &pool))
    return ffi::Error::InvalidArgument("expected the pool's chunks as results");
  // One thread: a 512-token call writes ~0.2 M values per layer, less than handing work to the pool would cost.
  for (int64_t x = 0; x < tokens; ++x) {
    const int64_t id = pages[x], offset = offsets[x];
    if (id < 0 || id >= pool.first.back() || offset < 0 || offset >= pool.page) continue;
    for (int64_t head = 0; head < pool.heads; ++head) {
      const int64_t at = (x * pool.heads + head) * pool.dim;
      batchgen::WriteEntry(pool, id, head, offset, new_k + at, new_v + at);
    }
  }
  return ffi::Error::Success();
}

ffi::Error PagedWrite(ffi::Buffer<ffi::F32> new_k, ffi::Buffer<ffi::F32> new_v, ffi::Buffer<ffi::S32> pages,
                      ffi::Buffer<ffi::S32> offsets, ffi::RemainingArgs chunks, ffi::RemainingRets written) {
  if (chunks.size() % 2 != 0 || written.size() != chunks.size())
    return ffi::Error::InvalidArgument("expected keys and values for every chunk, as arguments and as results");
  const int64_t tokens = pages.element_count();
  if (offsets.element_count() != tokens || new_v.element_count() != new_k.element_count())
    return ffi::Error::InvalidArgument("pages, offsets, new_k and new_v must agree on the tokens");
  auto first = chunks.get<ffi::AnyBuffer>(0);
  if (!first.has_value()) return ffi::Error::InvalidArgument("expected the pool's chunks");
  const auto dims = first->dimensions();  // [n, K, D, P]
  if (new_k.element_count() != tokens * dims[1] * dims[2])
    return ffi::Error::InvalidArgument("new_k and new_v must be [X, K, D]");
  const size_t count = chunks.size() / 2;
  switch (first->element_type()) {
    case ffi::DataType::F32:
      return WriteTokens<float>(new_k.typed_data(), new_v.typed_data(), pages.typed_data(), offsets.typed_data(),
                                tokens, written, count);
    case ffi::DataType::BF16:
      return WriteTokens<batchgen::BFloat16>(new_k.typed_data(), new_v.typed_data(), pages.typed_data(),
                                             offsets.typed_data(), tokens, written, count);
    default: return ffi::Error::InvalidArgument("pool chunks must be float32 or bfloat16");
  }
}

ffi::Error PagedCopy(ffi::Buffer<ffi::S32> source, ffi::Buffer<ffi::S32> target, ffi::RemainingArgs chunks,
                     ffi::RemainingRets written) {
  if (written.size() != chunks.size() || chunks.size() == 0)
    return ffi::Error::InvalidArgument("expected the chunks as arguments and as results");
  std::vector<char*> data;
  std::vector<int64_t> first{0};
  size_t page_bytes = 0;
  for (size_t c = 0; c < written.size(); ++c) {
    auto chunk = written.get<ffi::AnyBuffer>(c);
    if (!chunk.has_value()) return ffi::Error::InvalidArgument("expected the chunks as results");
    const int64_t n = (*chunk)->dimensions()[0];
    page_bytes = (*chunk)->size_bytes() / n;
    data.push_back(static_cast<char*>((*chunk)->untyped_data()));
    first.push_back(first.back() + n);
  }
  const int64_t m = source.element_count(), total = first.back();
  if (target.element_count() != m) return ffi::Error::InvalidArgument("source and target must have one length");
  auto page = [&](int64_t id) {
    const int64_t c = std::upper_bound(first.begin(), first.end(), id) - first.begin() - 1;
    return data[c] + (id - first[c]) * page_bytes;
  };
  std::vector<char> taken(m * page_bytes);  // every source first: a page may be both a source and a target
  for (int64_t i = 0; i < m; ++i) {
    const int64_t id = std::clamp<int64_t>(source.typed_data()[i], 0, total - 1);  // as XLA's clamped gather
    std::memcpy(taken.data() + i * page_bytes, page(id), page_bytes);
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t id = target.typed_data()[i];
    if (id >= 0 && id < total) std::memcpy(page(id), taken.data() + i * page_bytes, page_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenPagedWrite, PagedWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchgenPagedCopy, PagedCopy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
