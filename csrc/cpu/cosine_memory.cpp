// Cosine memory CPU kernels: fastdd_C::max_cosine and fastdd_C::most_similar_index.
//
// cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)), eps an argument (fastdd.ops.reference.COS_EPS),
// accumulated in float32 (float64 for float64 inputs; bfloat16 / float16 inputs are widened to float32 first).
// Rows of memory at or past `count` are ignored; ties go to the lowest index (like torch.max / torch.argmax).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

template <typename acc_t>
FASTDD_INLINE acc_t inverse_norm(acc_t squared_norm, acc_t eps) {
  return acc_t(1) / std::max(std::sqrt(squared_norm), eps);
}

// cos_row[b] = cos(query_b, row) for all B queries, kRowGroup queries per pass over the row; query_inv_norm: [B].
template <typename acc_t>
FASTDD_INLINE void row_cosines_impl(const acc_t* query, const acc_t* query_inv_norm, int64_t batch, const acc_t* row,
                                    int64_t dim, acc_t eps, acc_t* cos_row) {
  const acc_t row_inv_norm = inverse_norm(dot_impl(row, row, dim), eps);
  int64_t b = 0;
  for (; b + kRowGroup <= batch; b += kRowGroup) {
    acc_t dots[kRowGroup];
    group_dots_impl(query + b * dim, dim, row, dim, dots);
    for (int64_t k = 0; k < kRowGroup; ++k) cos_row[b + k] = dots[k] * query_inv_norm[b + k] * row_inv_norm;
  }
  for (; b < batch; ++b) cos_row[b] = dot_impl(query + b * dim, row, dim) * query_inv_norm[b] * row_inv_norm;
}

FASTDD_SIMD_CLONES void row_cosines(const float* q, const float* qn, int64_t B, const float* row, int64_t D, float eps,
                                    float* out) {
  row_cosines_impl(q, qn, B, row, D, eps, out);
}
FASTDD_SIMD_CLONES void row_cosines(const double* q, const double* qn, int64_t B, const double* row, int64_t D,
                                    double eps, double* out) {
  row_cosines_impl(q, qn, B, row, D, eps, out);
}

// column_sum[d] += weight * row[d]
template <typename acc_t>
FASTDD_INLINE void add_scaled_impl(acc_t* column_sum, const acc_t* row, acc_t weight, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) column_sum[d] += weight * row[d];
}
FASTDD_SIMD_CLONES void add_scaled(float* sum, const float* row, float w, int64_t D) { add_scaled_impl(sum, row, w, D); }
FASTDD_SIMD_CLONES void add_scaled(double* sum, const double* row, double w, int64_t D) {
  add_scaled_impl(sum, row, w, D);
}

int64_t valid_rows(const at::Tensor& count, int64_t rows) {
  TORCH_CHECK(count.dim() == 0 && !count.is_floating_point(), "count must be a 0-dim integer tensor");
  TORCH_CHECK(count.device().is_cpu(), "count must be a CPU tensor for the CPU kernel");
  return std::clamp<int64_t>(count.item<int64_t>(), 0, rows);
}

template <typename acc_t>
void max_cosine_kernel(const acc_t* query, const acc_t* memory, int64_t batch, int64_t rows, int64_t dim, acc_t eps,
                       acc_t* values, int64_t* indices) {
  std::vector<acc_t> query_inv_norm(batch);
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      query_inv_norm[b] = inverse_norm(dot(query + b * dim, query + b * dim, dim), eps);
  });
  // cosines[j * batch + b]: each task owns memory rows, so a row is read once and stays in cache
  // while every query meets it.
  std::vector<acc_t> cosines(rows * batch);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      row_cosines(query, query_inv_norm.data(), batch, memory + j * dim, dim, eps, cosines.data() + j * batch);
  });
  for (int64_t b = 0; b < batch; ++b) {
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_index = 0;
    for (int64_t j = 0; j < rows; ++j) {
      const acc_t c = cosines[j * batch + b];
      if (c > best) {
        best = c;
        best_index = j;
      }
    }
    values[b] = rows > 0 ? best : acc_t(0);
    indices[b] = best_index;
  }
}

std::tuple<at::Tensor, at::Tensor> max_cosine(const at::Tensor& query, const at::Tensor& memory,
                                              const at::Tensor& count, double eps) {
  TORCH_CHECK(query.dim() == 2 && memory.dim() == 2, "query must be [B, D] and memory [M, D]");
  TORCH_CHECK(query.size(1) == memory.size(1), "query and memory must have the same number of features");
  TORCH_CHECK(query.is_floating_point() && memory.is_floating_point(), "query and memory must be floating point");
  const auto acc = accumulation_type(query, memory);
  const int64_t batch = query.size(0), dim = query.size(1);
  const int64_t rows = valid_rows(count, memory.size(0));
  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor m = memory.narrow(0, 0, rows).to(acc).contiguous();
  at::Tensor values = at::empty({batch}, query.options().dtype(acc));
  at::Tensor indices = at::empty({batch}, query.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc, "max_cosine", [&] {
    max_cosine_kernel<scalar_t>(q.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), batch, rows, dim, scalar_t(eps),
                                values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  return {values, indices};
}

template <typename acc_t>
int64_t most_similar_kernel(const acc_t* memory, int64_t rows, int64_t dim, acc_t eps) {
  if (rows == 0) return 0;
  std::vector<acc_t> inv_norm(rows);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      inv_norm[j] = inverse_norm(dot(memory + j * dim, memory + j * dim, dim), eps);
  });
  // unit_sum = Σ_j memory_j / ‖memory_j‖, split over feature chunks.
  std::vector<acc_t> unit_sum(dim, acc_t(0));
  constexpr int64_t kFeatureChunk = 512;
  at::parallel_for(0, (dim + kFeatureChunk - 1) / kFeatureChunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t d0 = begin * kFeatureChunk, d1 = std::min(dim, end * kFeatureChunk);
    for (int64_t j = 0; j < rows; ++j) add_scaled(unit_sum.data() + d0, memory + j * dim + d0, inv_norm[j], d1 - d0);
  });
  // score_i = unit_i · unit_sum = Σ_j cos(memory_i, memory_j)
  std::vector<acc_t> scores(rows);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) scores[i] = dot(memory + i * dim, unit_sum.data(), dim) * inv_norm[i];
  });
  return std::max_element(scores.begin(), scores.end()) - scores.begin();  // first of equal maxima
}

at::Tensor most_similar_index(const at::Tensor& memory, const at::Tensor& count, double eps) {
  TORCH_CHECK(memory.dim() == 2 && memory.is_floating_point(), "memory must be a floating-point [M, D] tensor");
  const auto acc = accumulation_type(memory);
  const int64_t rows = valid_rows(count, memory.size(0));
  const at::Tensor m = memory.narrow(0, 0, rows).to(acc).contiguous();
  int64_t index = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "most_similar_index", [&] {
    index = most_similar_kernel<scalar_t>(m.data_ptr<scalar_t>(), rows, memory.size(1), scalar_t(eps));
  });
  return at::scalar_tensor(index, memory.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("max_cosine(Tensor query, Tensor memory, Tensor count, float eps) -> (Tensor, Tensor)");
  m.def("most_similar_index(Tensor memory, Tensor count, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("max_cosine", &max_cosine);
  m.impl("most_similar_index", &most_similar_index);
}
