// Helpers shared by the CPU kernels in csrc/cpu: SIMD multiversioning macros, the dot-product loops and
// the accumulation dtype. Everything is in an anonymous namespace: each kernel file gets its own copy.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// Hot loops are compiled for AVX-512 and AVX2+FMA too and picked at load time (GCC function
// multiversioning); elsewhere they are plain loops the compiler vectorises for the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTDD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDD_SIMD_CLONES
#endif
#define FASTDD_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kRowGroup = 4;  // rows sharing one pass over another row (see group_dots_impl)

// Σ_d a[d] · b[d], inlined into the caller (and so into its SIMD clone).
template <typename acc_t>
FASTDD_INLINE acc_t dot_impl(const acc_t* a, const acc_t* b, int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < len; ++d) sum += a[d] * b[d];
  return sum;
}

// out[k] = Σ_d x_k[d] · y[d] for the kRowGroup rows x_k = x + k · x_stride: y is read once for all four.
template <typename acc_t>
FASTDD_INLINE void group_dots_impl(const acc_t* x, int64_t x_stride, const acc_t* y, int64_t len, acc_t* out) {
  const acc_t* x0 = x;
  const acc_t* x1 = x + x_stride;
  const acc_t* x2 = x + 2 * x_stride;
  const acc_t* x3 = x + 3 * x_stride;
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < len; ++d) {
    const acc_t v = y[d];
    s0 += x0[d] * v;
    s1 += x1[d] * v;
    s2 += x2[d] * v;
    s3 += x3[d] * v;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// dot_impl as a multiversioned call (for callers that are not SIMD clones themselves).
[[maybe_unused]] FASTDD_SIMD_CLONES float dot(const float* a, const float* b, int64_t len) {
  return dot_impl(a, b, len);
}
[[maybe_unused]] FASTDD_SIMD_CLONES double dot(const double* a, const double* b, int64_t len) {
  return dot_impl(a, b, len);
}

// The dtype the kernels compute in: float64 when any input is float64, else float32 (bfloat16 / float16
// are widened).
[[maybe_unused]] at::ScalarType accumulation_type(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
[[maybe_unused]] at::ScalarType accumulation_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

}  // namespace
