// Mercer-kernel distance CPU kernels: fastdd_C::mercer_distance and fastdd_C::mercer_distance_backward.
//
// out_b = (1/N) Σ_n √(max(K(x_b,x_b) + K(y_n,y_n) − 2K(x_b,y_n), 0) + eps), kernels linear / rbf / poly
// (fastdd/ops/reference.py). Each kernel is a function of dot_bn = x_b·y_n, ‖x_b‖² and ‖y_n‖², so the
// forward is one pass over y: per block of `block` features (x's block stays in L2), every y row is widened
// to the accumulation type (float32, float64 for float64 x) in a small L1 buffer and meets all B rows of x,
// accumulating the [B, N] dots and ‖y_n‖²; a fused OpenMP loop then applies the kernel, the sqrt and the
// backward coefficients. A bfloat16 y is read as is (half the bytes of a float32 matmul), never copied.
// Memory is O(B·N + threads·block), never [B, N, D].
//
// Backward coefficients (fastdd/ops/mercer.py): ∂L/∂x_b = g_b · (alpha_b · x_b − Σ_n coef_bn · y_n),
// coef and alpha already divided by N; Σ_n coef_bn · y_n is one more pass over y, per feature block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

enum Kernel : int64_t { kLinear = 0, kRbf = 1, kPoly = 2 };

template <typename acc_t>
struct KernelParams {
  int64_t kernel;
  acc_t inv_sigma_sq;  // rbf: 1 / σ²
  int64_t degree;      // poly
  acc_t coef0;         // poly
  acc_t dim;           // poly: features D
  acc_t eps;
  acc_t inv_rows;      // 1 / N
};

template <typename acc_t>
inline acc_t integer_power(acc_t base, int64_t exponent) {
  acc_t result = 1;
  for (; exponent > 0; exponent >>= 1, base *= base)
    if (exponent & 1) result *= base;
  return result;
}

// One (b, n) pair: the distance and its backward coefficients (before the 1/N).
//   coef  = −∂d/∂dot,   alpha_term = 2 ∂d/∂‖x‖²   (gradients of clamp_min(0) pass where its input >= 0,
//   like torch's).
template <typename acc_t>
inline void pair_terms(acc_t dot, acc_t x_sq, acc_t y_sq, const KernelParams<acc_t>& p, acc_t& distance, acc_t& coef,
                       acc_t& alpha_term) {
  acc_t squared, kxy = 0, uxx = 0, uxy = 0, sq_dist = 0;
  if (p.kernel == kLinear) {
    squared = x_sq + y_sq - 2 * dot;
  } else if (p.kernel == kRbf) {
    sq_dist = x_sq + y_sq - 2 * dot;
    kxy = std::exp(-std::max(sq_dist, acc_t(0)) * (acc_t(0.5) * p.inv_sigma_sq));
    squared = acc_t(2) - 2 * kxy;
  } else {
    uxx = x_sq / p.dim + p.coef0;
    uxy = dot / p.dim + p.coef0;
    const acc_t uyy = y_sq / p.dim + p.coef0;
    squared = integer_power(uxx, p.degree) + integer_power(uyy, p.degree) - 2 * integer_power(uxy, p.degree);
  }
  distance = std::sqrt(std::max(squared, acc_t(0)) + p.eps);
  if (!(squared >= 0)) {
    coef = alpha_term = 0;
    return;
  }
  const acc_t inv_distance = acc_t(1) / distance;
  if (p.kernel == kLinear) {
    coef = alpha_term = inv_distance;
  } else if (p.kernel == kRbf) {
    coef = alpha_term = sq_dist >= 0 ? kxy * p.inv_sigma_sq * inv_distance : acc_t(0);
  } else {
    const acc_t scale = acc_t(p.degree) / p.dim * inv_distance;
    coef = scale * integer_power(uxy, p.degree - 1);
    alpha_term = scale * integer_power(uxx, p.degree - 1);
  }
}

template <typename acc_t>
void row_squared_norms(const acc_t* rows, int64_t count, int64_t dim, acc_t* out) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = rows + i * dim;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += row[d] * row[d];
      out[i] = sum;
    }
  });
}

// ---------------------------------------------------------------------------------------------- hot loops
FASTDD_SIMD_CLONES void group_dots(const float* x, int64_t stride, const float* y, int64_t len, float* out) {
  group_dots_impl(x, stride, y, len, out);
}
FASTDD_SIMD_CLONES void group_dots(const double* x, int64_t stride, const double* y, int64_t len, double* out) {
  group_dots_impl(x, stride, y, len, out);
}

// acc[d] += Σ_r c[r] · rows[r · len + d] for the kRowGroup rows of a widened group.
template <typename acc_t>
FASTDD_INLINE void group_axpy_impl(acc_t* acc, const acc_t* rows, const acc_t* c, int64_t len) {
  const acc_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  const acc_t* r0 = rows;
  const acc_t* r1 = rows + len;
  const acc_t* r2 = rows + 2 * len;
  const acc_t* r3 = rows + 3 * len;
#pragma omp simd
  for (int64_t d = 0; d < len; ++d) acc[d] += c0 * r0[d] + c1 * r1[d] + c2 * r2[d] + c3 * r3[d];
}
FASTDD_SIMD_CLONES void group_axpy(float* acc, const float* rows, const float* c, int64_t len) {
  group_axpy_impl(acc, rows, c, len);
}
FASTDD_SIMD_CLONES void group_axpy(double* acc, const double* rows, const double* c, int64_t len) {
  group_axpy_impl(acc, rows, c, len);
}

// len elements of src widened into dst.
template <typename in_t, typename acc_t>
FASTDD_INLINE void widen(const in_t* src, int64_t len, acc_t* dst) {
#pragma omp simd
  for (int64_t d = 0; d < len; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

// Features [d0, d0 + len) of row n of y in acc_t: y itself when it has that type, else widened into buffer.
template <typename in_t, typename acc_t>
FASTDD_INLINE const acc_t* row_block(const in_t* y, int64_t dim, int64_t n, int64_t d0, int64_t len, acc_t* buffer) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    return y + n * dim + d0;
  } else {
    widen(y + n * dim + d0, len, buffer);
    return buffer;
  }
}

// ---------------------------------------------------------------------------------------------- drivers
// dots[b, n] = x_b · y_n ([B, N], zeroed by the caller) and, when y_sq is not null, y_sq[n] = ‖y_n‖² (zeroed).
// x: [B, D] contiguous acc_t; y: [N, D] contiguous in_t. One pass over y.
template <typename in_t, typename acc_t>
void gram_terms(const acc_t* x, const in_t* y, int64_t batch, int64_t rows, int64_t dim, int64_t block, acc_t* dots,
                acc_t* y_sq) {
  for (int64_t d0 = 0; d0 < dim; d0 += block) {
    const int64_t len = std::min(block, dim - d0);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(std::is_same_v<in_t, acc_t> ? 0 : len);
      for (int64_t n = begin; n < end; ++n) {
        const acc_t* row = row_block(y, dim, n, d0, len, buffer.data());
        if (y_sq != nullptr) y_sq[n] += dot(row, row, len);
        int64_t b = 0;
        for (; b + kRowGroup <= batch; b += kRowGroup) {
          acc_t group[kRowGroup];
          group_dots(x + b * dim + d0, dim, row, len, group);
          for (int64_t k = 0; k < kRowGroup; ++k) dots[(b + k) * rows + n] += group[k];
        }
        for (; b < batch; ++b) dots[b * rows + n] += dot(x + b * dim + d0, row, len);
      }
    });
  }
}

// grad_x[b, d] = g_b · (alpha_b · x[b, d] − Σ_n coef[b, n] · y[n, d]), one task per block of features.
template <typename in_t, typename acc_t>
void weighted_gradient(const acc_t* g, const acc_t* alpha, const acc_t* x, const acc_t* coef, const in_t* y,
                       int64_t batch, int64_t rows, int64_t dim, int64_t block, acc_t* grad_x) {
  const int64_t blocks = (dim + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> group_rows(kRowGroup * block, acc_t(0)), weighted(batch * block);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t d0 = k * block, len = std::min(block, dim - d0);
      std::fill(weighted.begin(), weighted.end(), acc_t(0));
      for (int64_t n0 = 0; n0 < rows; n0 += kRowGroup) {
        const int64_t group = std::min(kRowGroup, rows - n0);
        for (int64_t r = 0; r < group; ++r) widen(y + (n0 + r) * dim + d0, len, group_rows.data() + r * len);
        for (int64_t b = 0; b < batch; ++b) {
          acc_t c[kRowGroup] = {0, 0, 0, 0};  // rows past the end keep stale (finite) values with weight 0
          for (int64_t r = 0; r < group; ++r) c[r] = coef[b * rows + n0 + r];
          group_axpy(weighted.data() + b * len, group_rows.data(), c, len);
        }
      }
      for (int64_t b = 0; b < batch; ++b) {
        const acc_t scale = g[b] * alpha[b];
        const acc_t* xb = x + b * dim + d0;
        const acc_t* wb = weighted.data() + b * len;
        acc_t* out = grad_x + b * dim + d0;
        const acc_t gb = g[b];
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) out[j] = scale * xb[j] - gb * wb[j];
      }
    }
  });
}

// The fused epilogue: distances summed into out, backward coefficients into coef [B, N] and alpha.
template <typename acc_t>
void epilogue(const acc_t* dots, const acc_t* x_sq, const acc_t* y_sq, int64_t batch, int64_t rows,
              const KernelParams<acc_t>& p, acc_t* out, acc_t* coef, acc_t* alpha) {
  std::vector<acc_t> distances(batch * rows), alpha_terms(batch * rows);
  at::parallel_for(0, batch * rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / rows, n = i % rows;
      acc_t c;
      pair_terms(dots[i], x_sq[b], y_sq[n], p, distances[i], c, alpha_terms[i]);
      coef[i] = c * p.inv_rows;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {  // serial sums: deterministic
    acc_t dist_sum = 0, alpha_sum = 0;
    for (int64_t n = 0; n < rows; ++n) {
      dist_sum += distances[b * rows + n];
      alpha_sum += alpha_terms[b * rows + n];
    }
    out[b] = dist_sum * p.inv_rows;
    alpha[b] = alpha_sum * p.inv_rows;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "x must be [B, D] and y [N, D]");
  TORCH_CHECK(x.is_floating_point() && y.is_floating_point(), "x and y must be floating point");
  TORCH_CHECK(y.size(0) > 0, "y must have at least one row");
  TORCH_CHECK(block > 0, "block must be positive");
}

// y's dtype for the inner dispatch: float64, float32, bfloat16, float16.
#define FASTDD_DISPATCH_Y(TYPE, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, "mercer_y", __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor> mercer_distance(const at::Tensor& x, const at::Tensor& y_in,
                                                               const std::optional<at::Tensor>& y_sqnorm,
                                                               int64_t kernel, double sigma, int64_t degree,
                                                               double coef0, double eps, int64_t block) {
  check_inputs(x, y_in, block);
  TORCH_CHECK(kernel >= kLinear && kernel <= kPoly, "kernel must be 0 (linear), 1 (rbf) or 2 (poly)");
  const at::Tensor y = y_in.contiguous();
  const auto acc = accumulation_type(x);
  const int64_t batch = x.size(0), dim = x.size(1), rows = y.size(0);
  const at::Tensor xa = x.to(acc).contiguous();
  const auto options = x.options().dtype(acc);
  at::Tensor out = at::empty({batch}, options), alpha = at::empty({batch}, options);
  at::Tensor coef = at::empty({batch, rows}, options), dots = at::zeros({batch, rows}, options);
  at::Tensor x_sq = at::empty({batch}, options);
  at::Tensor y_sq = y_sqnorm.has_value() ? y_sqnorm->to(acc).contiguous() : at::zeros({rows}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "mercer_distance", [&] {
    using acc_t = scalar_t;
    const KernelParams<acc_t> params{kernel, acc_t(1.0 / (sigma * sigma)), degree, acc_t(coef0),
                                     acc_t(dim), acc_t(eps), acc_t(1.0 / double(rows))};
    row_squared_norms(xa.data_ptr<acc_t>(), batch, dim, x_sq.data_ptr<acc_t>());
    acc_t* y_sq_out = y_sqnorm.has_value() ? nullptr : y_sq.data_ptr<acc_t>();
    FASTDD_DISPATCH_Y(y.scalar_type(), [&] {
      gram_terms<scalar_t, acc_t>(xa.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), batch, rows, dim, block,
                                  dots.data_ptr<acc_t>(), y_sq_out);
    });
    epilogue(dots.data_ptr<acc_t>(), x_sq.data_ptr<acc_t>(), y_sq.data_ptr<acc_t>(), batch, rows, params,
             out.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), alpha.data_ptr<acc_t>());
  });
  return {out, coef, alpha};
}

at::Tensor mercer_distance_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y_in,
                                    const at::Tensor& coef, const at::Tensor& alpha, int64_t block) {
  check_inputs(x, y_in, block);
  const at::Tensor y = y_in.contiguous();
  const auto acc = accumulation_type(x);
  const int64_t batch = x.size(0), dim = x.size(1), rows = y.size(0);
  TORCH_CHECK(coef.sizes() == at::IntArrayRef({batch, rows}) && alpha.size(0) == batch, "coef must be [B, N]");
  const at::Tensor xa = x.to(acc).contiguous(), coef_acc = coef.to(acc).contiguous();
  const at::Tensor g = grad_out.to(acc).contiguous(), a = alpha.to(acc).contiguous();
  at::Tensor grad_x = at::empty({batch, dim}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "mercer_distance_backward", [&] {
    using acc_t = scalar_t;
    FASTDD_DISPATCH_Y(y.scalar_type(), [&] {
      weighted_gradient<scalar_t, acc_t>(g.data_ptr<acc_t>(), a.data_ptr<acc_t>(), xa.data_ptr<acc_t>(),
                                         coef_acc.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), batch, rows, dim, block,
                                         grad_x.data_ptr<acc_t>());
    });
  });
  return grad_x.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def(
      "mercer_distance(Tensor x, Tensor y, Tensor? y_sqnorm, int kernel, float sigma, int degree, float coef0, "
      "float eps, int block) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mercer_distance_backward(Tensor grad_out, Tensor x, Tensor y, Tensor coef, Tensor alpha, int block) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("mercer_distance", &mercer_distance);
  m.impl("mercer_distance_backward", &mercer_distance_backward);
}
