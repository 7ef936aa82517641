// D3HR group sampling CPU kernels: fastdd_C::group_score(groups [G, ipc, D], mean [D], std [D], w_mean, w_std, w_skew)
// -> [G], and fastdd_C::group_sampling, the reference's chunked draw + selection scored by group_score.
//
// score_g = w_mean·‖mean over members − mean‖
//         + w_std·‖unbiased std over members − std‖ (left out when ipc = 1)
//         + w_skew·‖skew per member‖ (both left out when ipc = 1), the authors' skewness_batch (D3HR
//           generation/group_sampling.py lines 170-177): each feature standardised across the group's members
//           (their mean and unbiased std), skew_i = Σ_d z_id³ · D / ((D − 1)(D − 2)).
// One task per group (OpenMP through at::parallel_for): the group is read from memory once and its later
// passes hit the cache, where the PyTorch reference makes a dozen passes over all [G, ipc, D]. Element-wise
// work is in the input precision (float32, or float64 for float64 input; bfloat16 / float16 are widened to
// float32), every reduction over features accumulates in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kFeatureChunk = 256;  // features whose per-member sums stay in L1 at once

struct FeatureErrors {
  double mean = 0;  // Σ_d (mean over members − mean[d])²
  double std = 0;   // Σ_d (unbiased std over members − std[d])²
};

// The per-feature statistics over the ipc members of one group [ipc, dim]; with ipc > 1 also each member's Σ_d z³
// (z: the feature standardised over the members) added into member_cubes[ipc].
template <typename scalar_t>
FASTDD_INLINE FeatureErrors feature_errors_impl(const scalar_t* group, const scalar_t* mean, const scalar_t* std,
                                                int64_t ipc, int64_t dim, double* member_cubes) {
  FeatureErrors errors;
  scalar_t member_sum[kFeatureChunk];
  scalar_t squares[kFeatureChunk];
  scalar_t inverse_std[kFeatureChunk];
  for (int64_t d0 = 0; d0 < dim; d0 += kFeatureChunk) {
    const int64_t width = std::min(kFeatureChunk, dim - d0);
    std::fill_n(member_sum, width, scalar_t(0));
    std::fill_n(squares, width, scalar_t(0));
    for (int64_t i = 0; i < ipc; ++i) {
      const scalar_t* row = group + i * dim + d0;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) member_sum[d] += row[d];
    }
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) member_sum[d] /= scalar_t(ipc);  // now the member mean
    for (int64_t i = 0; i < ipc; ++i) {
      const scalar_t* row = group + i * dim + d0;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) {
        const scalar_t centred = row[d] - member_sum[d];
        squares[d] += centred * centred;
      }
    }
    double mean_error = 0, std_error = 0;
    const scalar_t std_divisor = scalar_t(std::max<int64_t>(ipc - 1, 1));
#pragma omp simd reduction(+ : mean_error, std_error)
    for (int64_t d = 0; d < width; ++d) {
      const scalar_t member_std = std::sqrt(squares[d] / std_divisor);
      inverse_std[d] = scalar_t(1) / member_std;
      const double mean_gap = double(member_sum[d]) - double(mean[d0 + d]);
      const double std_gap = double(member_std) - double(std[d0 + d]);
      mean_error += mean_gap * mean_gap;
      std_error += std_gap * std_gap;
    }
    errors.mean += mean_error;
    errors.std += std_error;
    if (ipc > 1) {
      for (int64_t i = 0; i < ipc; ++i) {
        const scalar_t* row = group + i * dim + d0;
        double cubes = 0;
#pragma omp simd reduction(+ : cubes)
        for (int64_t d = 0; d < width; ++d) {
          const scalar_t z = (row[d] - member_sum[d]) * inverse_std[d];
          cubes += double(z * z * z);
        }
        member_cubes[i] += cubes;
      }
    }
  }
  return errors;
}

FASTDD_SIMD_CLONES FeatureErrors feature_errors(const float* g, const float* m, const float* s, int64_t ipc,
                                                int64_t D, double* cubes) {
  return feature_errors_impl(g, m, s, ipc, D, cubes);
}
FASTDD_SIMD_CLONES FeatureErrors feature_errors(const double* g, const double* m, const double* s, int64_t ipc,
                                                int64_t D, double* cubes) {
  return feature_errors_impl(g, m, s, ipc, D, cubes);
}

template <typename scalar_t>
void group_score_kernel(const scalar_t* groups, const scalar_t* mean, const scalar_t* std, int64_t n_groups,
                        int64_t ipc, int64_t dim, double w_mean, double w_std, double w_skew, scalar_t* scores) {
  const double n = double(dim);
  const double skew_factor = n / ((n - 1) * (n - 2));
  at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> member_cubes(ipc);
    for (int64_t g = begin; g < end; ++g) {
      const scalar_t* group = groups + g * ipc * dim;
      std::fill(member_cubes.begin(), member_cubes.end(), 0.0);
      const FeatureErrors errors = feature_errors(group, mean, std, ipc, dim, member_cubes.data());
      double score = w_mean * std::sqrt(errors.mean);
      if (ipc > 1) {
        double skew_squares = 0;
        for (const double cubes : member_cubes) skew_squares += (cubes * skew_factor) * (cubes * skew_factor);
        score += w_std * std::sqrt(errors.std) + w_skew * std::sqrt(skew_squares);
      }
      scores[g] = scalar_t(score);
    }
  });
}

at::Tensor group_score(const at::Tensor& groups, const at::Tensor& mean, const at::Tensor& std, double w_mean,
                       double w_std, double w_skew) {
  TORCH_CHECK(groups.dim() == 3, "groups must be [G, ipc, D]");
  TORCH_CHECK(mean.dim() == 1 && std.dim() == 1 && mean.size(0) == groups.size(2) && std.size(0) == groups.size(2),
              "mean and std must be [D] with the D of groups");
  TORCH_CHECK(groups.is_floating_point() && mean.is_floating_point() && std.is_floating_point(),
              "groups, mean and std must be floating point");
  const auto acc = accumulation_type(groups);
  const at::Tensor g = groups.to(acc).contiguous();
  const at::Tensor m = mean.to(acc).contiguous();
  const at::Tensor s = std.to(acc).contiguous();
  at::Tensor scores = at::empty({groups.size(0)}, groups.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "group_score", [&] {
    group_score_kernel<scalar_t>(g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), groups.size(0),
                                 groups.size(1), groups.size(2), w_mean, w_std, w_skew, scores.data_ptr<scalar_t>());
  });
  return scores;
}

// fastdd.ops.reference.group_sampling with the fused score: candidates drawn exactly as there
// (randn(chunk, ipc, D) * std + mean from `generator`, chunk after chunk), the first lowest score kept.
std::tuple<at::Tensor, at::Tensor> group_sampling(const at::Tensor& mean, const at::Tensor& std, int64_t ipc,
                                                  int64_t n_candidates, std::optional<at::Generator> generator,
                                                  double w_mean, double w_std, double w_skew, int64_t chunk) {
  TORCH_CHECK(mean.dim() == 1 && std.sizes() == mean.sizes(), "mean and std must be [D]");
  TORCH_CHECK(ipc > 0 && n_candidates > 0 && chunk > 0, "ipc, n_candidates and chunk must be positive");
  at::Tensor best_group, best_score;
  for (int64_t start = 0; start < n_candidates; start += chunk) {
    const int64_t size = std::min(chunk, n_candidates - start);
    at::Tensor groups = at::randn({size, ipc, mean.size(0)}, generator, mean.options());
    groups.mul_(std).add_(mean);
    // a NaN score (a feature on which all members are equal: no skewness) is never chosen
    const at::Tensor scores = at::nan_to_num(group_score(groups, mean, std, w_mean, w_std, w_skew),
                                             std::numeric_limits<double>::infinity())
                                  .to(mean.scalar_type());
    const int64_t index = scores.argmin().item<int64_t>();
    const at::Tensor score = scores[index];
    if (!best_group.defined() || score.lt(best_score).item<bool>()) {
      best_score = score.clone();  // not a view into the chunk's scores
      best_group = groups[index].clone();
    }
  }
  return {best_group, best_score};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("group_score(Tensor groups, Tensor mean, Tensor std, float w_mean, float w_std, float w_skew) -> Tensor");
  m.def(
      "group_sampling(Tensor mean, Tensor std, int ipc, int n_candidates, Generator? generator, float w_mean, "
      "float w_std, float w_skew, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("group_score", &group_score);
  m.impl("group_sampling", &group_sampling);
}
