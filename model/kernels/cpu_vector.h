// The product kernel's vector of floats, chosen by the build's target (-march=native): an AVX-512 register of 16
// floats, or an AVX2 one of 8 (with FMA). The kernel is written once against these few operations and kLanes.
// BATCHGEN_VECTOR is 0 on a CPU with neither, where the kernel refuses to build.
// (The attention kernel keeps its own AVX-512 intrinsics and plain loops elsewhere: written against this vector,
// with its page prefetches, it ran no faster on an AVX2 EPYC: gcc vectorizes the plain loops, and the pass is
// bound by memory reads, 64 slots x 400 cached tokens 176 ms a step either way.)

#ifndef BATCHGEN_KERNELS_CPU_VECTOR_H_
#define BATCHGEN_KERNELS_CPU_VECTOR_H_

#include <immintrin.h>

#include <cstdint>

namespace batchgen {

#if defined(__AVX512F__)
#define BATCHGEN_VECTOR 1
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
#define BATCHGEN_VECTOR 1
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
#else
#define BATCHGEN_VECTOR 0
#endif

}  // namespace batchgen

#endif  // BATCHGEN_KERNELS_CPU_VECTOR_H_
