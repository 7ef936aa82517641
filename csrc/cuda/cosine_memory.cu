// Cosine memory CUDA kernels: the CUDA dispatch of fastdd_C::max_cosine and fastdd_C::most_similar_index
// (schemas and CPU kernels in csrc/cpu/cosine_memory.cpp; same semantics).
//
// cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)), eps an argument (fastdd.ops.reference.COS_EPS), accumulated
// in float32 (float64 when an input is float64); bfloat16 / float16 memories are widened on load. Rows of memory
// at or past `count` are ignored; ties go to the lowest index. `count` is read by the kernels from device
// memory, so no call syncs with the host and every call can be captured in a CUDA graph.
//
// max_cosine (2 launches):
//   scaled_dots_kernel  one block per (memory row j, tile of kQueryTile queries): streams row j once with
//                       16-byte loads, giving scaled[b, j] = (q_b · m_j) / max(‖m_j‖, eps); the blocks of
//                       row 0 also give 1 / max(‖q_b‖, eps).
//   select_best_kernel  one block per query: max / argmax of scaled[b, :count] · inv‖q_b‖.
// most_similar_index (4 launches, O(M·D) by score_i = m̂_i · Σ_j m̂_j = Σ_j cos(m_i, m_j)):
//   row_inverse_norms_kernel  one block per row: 1 / max(‖m_j‖, eps).
//   unit_sum_kernel           Σ_{j < count} m_j / max(‖m_j‖, eps): blocks own feature columns, the warps
//                             of a block split the rows; summed in a fixed order (deterministic).
//   row_scores_kernel         one block per row: score_i (-inf for rows at or past count).
//   select_best_kernel        argmax of the scores (first of equal maxima; 0 when no row is valid).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>

namespace {

constexpr int kWarpSize = 32;
constexpr int kRowThreads = 128;   // threads streaming one memory row (scaled_dots, row norms, row scores)
constexpr int kQueryTile = 4;      // queries sharing one pass over a memory row
constexpr int kSelectThreads = 128;
constexpr int kColumnLanes = 32;   // unit_sum_kernel: threads along the features ...
constexpr int kRowSlots = 8;       // ... and along the rows of one block
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ int64_t valid_rows(const int64_t* count, int64_t rows) {
  const int64_t n = *count;
  return n < 0 ? 0 : (n > rows ? rows : n);
}

// 1 / max(‖x‖, eps) = min(1 / sqrt(‖x‖²), inv_eps = 1 / eps), as rsqrt (within 2 ulp): the correctly rounded double
// division and sqrt need a stack frame (local memory) on sm_80.
__device__ __forceinline__ float inverse_norm(float squared_norm, float inv_eps) {
  return fminf(rsqrtf(squared_norm), inv_eps);
}
__device__ __forceinline__ double inverse_norm(double squared_norm, double inv_eps) {
  return fmin(rsqrt(squared_norm), inv_eps);
}

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

// out[k] = p[k] for k < N, widened to acc_t. 16-byte loads when N elements fill whole 16-byte chunks
// (p must then be 16-byte aligned), element loads otherwise.
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_widened(const T* __restrict__ p, acc_t (&out)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPerChunk; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + c);
      const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerChunk; ++k) out[c * kPerChunk + k] = static_cast<acc_t>(elements[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<acc_t>(p[k]);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Sums values[k] over the block (kThreads threads); the sums are valid in thread 0. Call once per kernel.
template <int kThreads, typename T, int kCount>
__device__ __forceinline__ void block_sum(T (&values)[kCount]) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ T partial[kWarps][kCount];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < kCount; ++k) values[k] = warp_sum(values[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kCount; ++k) partial[warp][k] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kCount; ++k) values[k] = warp_sum(lane < kWarps ? partial[lane][k] : T(0));
  }
}

// (value, index) of the larger value; equal values keep the lower index.
template <typename T>
__device__ __forceinline__ void keep_better(T& best, int64_t& best_index, T value, int64_t index) {
  if (value > best || (value == best && index < best_index)) {
    best = value;
    best_index = index;
  }
}

// max / argmax over the block (kThreads threads); valid in thread 0. Call once per kernel.
template <int kThreads, typename T>
__device__ __forceinline__ void block_argmax(T& best, int64_t& best_index) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ T warp_best[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, best, offset);
    const auto other_index = __shfl_down_sync(0xffffffffu, static_cast<long long>(best_index), offset);
    keep_better(best, best_index, other, static_cast<int64_t>(other_index));
  }
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) keep_better(best, best_index, warp_best[w], warp_index[w]);
  }
}

// scaled[b, j] = (q_b · m_j) / max(‖m_j‖, eps) for the valid rows j; query_inv_norm[b] from the blocks of row 0.
// grid: (rows, ceil(batch / kQueryTile)); query: [batch, dim] contiguous; memory rows `memory_stride` apart.
template <typename acc_t, typename mem_t, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    scaled_dots_kernel(const acc_t* __restrict__ query, const mem_t* __restrict__ memory,
                       const int64_t* __restrict__ count, acc_t* __restrict__ scaled,
                       acc_t* __restrict__ query_inv_norm, int64_t batch, int64_t rows, int64_t dim,
                       int64_t memory_stride, acc_t inv_eps) {
  const int64_t row = blockIdx.x;
  if (row >= valid_rows(count, rows)) return;
  const int64_t first_query = static_cast<int64_t>(blockIdx.y) * kQueryTile;
  const int queries = batch - first_query < kQueryTile ? static_cast<int>(batch - first_query) : kQueryTile;
  const bool with_query_norms = row == 0;
  const mem_t* memory_row = memory + row * memory_stride;
  const acc_t* query_tile = query + first_query * dim;

  // sums[0, kQueryTile): dots; [kQueryTile, 2 kQueryTile): squared query norms; [2 kQueryTile]: squared row norm
  acc_t sums[2 * kQueryTile + 1] = {};
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < dim; d += kRowThreads * kVec) {
    acc_t m[kVec];
    load_widened<kVec>(memory_row + d, m);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sums[2 * kQueryTile] += m[k] * m[k];
#pragma unroll
    for (int b = 0; b < kQueryTile; ++b) {
      if (b < queries) {
        acc_t q[kVec];
        load_widened<kVec>(query_tile + b * dim + d, q);
#pragma unroll
        for (int k = 0; k < kVec; ++k) sums[b] += q[k] * m[k];
        if (with_query_norms) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) sums[kQueryTile + b] += q[k] * q[k];
        }
      }
    }
  }
  block_sum<kRowThreads>(sums);
  if (threadIdx.x == 0) {
    const acc_t row_inv_norm = inverse_norm(sums[2 * kQueryTile], inv_eps);
#pragma unroll
    for (int b = 0; b < kQueryTile; ++b) {  // constant indices keep sums in registers
      if (b < queries) {
        scaled[(first_query + b) * rows + row] = sums[b] * row_inv_norm;
        if (with_query_norms) query_inv_norm[first_query + b] = inverse_norm(sums[kQueryTile + b], inv_eps);
      }
    }
  }
}

// One block per query b: best[b] = max_{j < count} scaled[b, j] · scale[b] (scale = nullptr: 1) and its
// lowest index; best = 0, index = 0 when no row is valid. scaled: [batch, rows].
template <typename acc_t>
__global__ void __launch_bounds__(kSelectThreads)
    select_best_kernel(const acc_t* __restrict__ scaled, const acc_t* __restrict__ scale,
                       const int64_t* __restrict__ count, acc_t* __restrict__ best_values,
                       int64_t* __restrict__ best_indices, int64_t rows) {
  const int64_t query = blockIdx.x;
  const int64_t valid = valid_rows(count, rows);
  const acc_t factor = (scale != nullptr && valid > 0) ? scale[query] : acc_t(1);
  acc_t best = negative_infinity<acc_t>();
  int64_t best_index = rows;  // no candidate yet
  for (int64_t j = threadIdx.x; j < valid; j += kSelectThreads) {
    const acc_t value = scaled[query * rows + j] * factor;
    if (value > best) {  // ascending j: equal values keep the first
      best = value;
      best_index = j;
    }
  }
  block_argmax<kSelectThreads>(best, best_index);
  if (threadIdx.x == 0) {
    if (best_values != nullptr) best_values[query] = valid > 0 ? best : acc_t(0);
    best_indices[query] = best_index < valid ? best_index : 0;
  }
}

// inv_norm[j] = 1 / max(‖m_j‖, eps) for the valid rows (0 for the others). grid: rows.
template <typename acc_t, typename mem_t, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    row_inverse_norms_kernel(const mem_t* __restrict__ memory, const int64_t* __restrict__ count,
                             acc_t* __restrict__ inv_norm, int64_t rows, int64_t dim, int64_t memory_stride,
                             acc_t inv_eps) {
  const int64_t row = blockIdx.x;
  if (row >= valid_rows(count, rows)) {
    if (threadIdx.x == 0) inv_norm[row] = acc_t(0);
    return;
  }
  const mem_t* memory_row = memory + row * memory_stride;
  acc_t squared_norm[1] = {};
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < dim; d += kRowThreads * kVec) {
    acc_t m[kVec];
    load_widened<kVec>(memory_row + d, m);
#pragma unroll
    for (int k = 0; k < kVec; ++k) squared_norm[0] += m[k] * m[k];
  }
  block_sum<kRowThreads>(squared_norm);
  if (threadIdx.x == 0) inv_norm[row] = inverse_norm(squared_norm[0], inv_eps);
}

// unit_sum[d] = Σ_{j < count} m[j, d] · inv_norm[j]. block: (kColumnLanes, kRowSlots); block x owns
// kColumnLanes · kVec features, thread row slot s the rows j ≡ s (mod kRowSlots). grid: ceil(dim / (kColumnLanes · kVec)).
template <typename acc_t, typename mem_t, int kVec>
__global__ void __launch_bounds__(kColumnLanes* kRowSlots)
    unit_sum_kernel(const mem_t* __restrict__ memory, const int64_t* __restrict__ count,
                    const acc_t* __restrict__ inv_norm, acc_t* __restrict__ unit_sum, int64_t rows, int64_t dim,
                    int64_t memory_stride) {
  __shared__ acc_t partial[kRowSlots][kColumnLanes * kVec];
  const int64_t first_feature = (static_cast<int64_t>(blockIdx.x) * kColumnLanes + threadIdx.x) * kVec;
  const bool active = first_feature < dim;
  const int64_t valid = valid_rows(count, rows);
  acc_t sum[kVec] = {};
  if (active) {
#pragma unroll 4
    for (int64_t j = threadIdx.y; j < valid; j += kRowSlots) {
      acc_t m[kVec];
      load_widened<kVec>(memory + j * memory_stride + first_feature, m);
      const acc_t weight = inv_norm[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum[k] += m[k] * weight;
    }
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) partial[threadIdx.y][threadIdx.x * kVec + k] = sum[k];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc_t total = 0;
#pragma unroll
      for (int s = 0; s < kRowSlots; ++s) total += partial[s][threadIdx.x * kVec + k];
      unit_sum[first_feature + k] = total;
    }
  }
}

// scores[i] = inv_norm[i] · (m_i · unit_sum) = Σ_{j < count} cos(m_i, m_j); -inf for the rows at or past count.
// grid: rows.
template <typename acc_t, typename mem_t, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    row_scores_kernel(const mem_t* __restrict__ memory, const int64_t* __restrict__ count,
                      const acc_t* __restrict__ inv_norm, const acc_t* __restrict__ unit_sum,
                      acc_t* __restrict__ scores, int64_t rows, int64_t dim, int64_t memory_stride) {
  const int64_t row = blockIdx.x;
  if (row >= valid_rows(count, rows)) {
    if (threadIdx.x == 0) scores[row] = negative_infinity<acc_t>();
    return;
  }
  const mem_t* memory_row = memory + row * memory_stride;
  acc_t dot[1] = {};
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < dim; d += kRowThreads * kVec) {
    acc_t m[kVec], s[kVec];
    load_widened<kVec>(memory_row + d, m);
    load_widened<kVec>(unit_sum + d, s);
#pragma unroll
    for (int k = 0; k < kVec; ++k) dot[0] += m[k] * s[k];
  }
  block_sum<kRowThreads>(dot);
  if (threadIdx.x == 0) scores[row] = dot[0] * inv_norm[row];
}

// ----------------------------------------------------------------------------------------------- host side

at::ScalarType accumulation_type(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte load of mem_t when every row of memory (and of the acc_t tensors read alongside it)
// starts on a 16-byte boundary; 1 (element loads) otherwise.
template <typename mem_t>
int vector_width(const at::Tensor& memory, std::initializer_list<const void*> other_pointers) {
  constexpr int kVec = 16 / sizeof(mem_t);
  bool ok = memory.size(1) % kVec == 0 && aligned16(memory.data_ptr()) &&
            (memory.stride(0) * static_cast<int64_t>(sizeof(mem_t))) % 16 == 0;
  for (const void* p : other_pointers) ok = ok && aligned16(p);
  return ok ? kVec : 1;
}

// memory with unit feature stride, in a dtype the kernels read: acc_t when acc is float64, else as is.
at::Tensor readable_memory(const at::Tensor& memory, at::ScalarType acc) {
  at::Tensor m = acc == at::kDouble ? memory.to(at::kDouble) : memory;
  return m.stride(1) == 1 ? m : m.contiguous();
}

void check_inputs(const at::Tensor& memory, const at::Tensor& count) {
  TORCH_CHECK(memory.dim() == 2 && memory.is_floating_point(), "memory must be a floating-point [M, D] tensor");
  TORCH_CHECK(memory.is_cuda(), "memory must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(memory.size(0) <= INT32_MAX, "memory may have at most 2^31 - 1 rows for the CUDA kernel");
  TORCH_CHECK(count.dim() == 0 && !count.is_floating_point(), "count must be a 0-dim integer tensor");
  TORCH_CHECK(count.device() == memory.device(), "count must be on the device of memory");
  const auto dtype = memory.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "memory must be float32, float64, bfloat16 or float16");
}

// Calls launch.template operator()<acc_t, mem_t>() for the accumulation / memory dtypes (memory as
// returned by readable_memory).
template <typename Launch>
void dispatch_dtypes(at::ScalarType acc, at::ScalarType memory_dtype, Launch&& launch) {
  if (acc == at::kDouble) return launch.template operator()<double, double>();
  switch (memory_dtype) {
    case at::kFloat: return launch.template operator()<float, float>();
    case at::kBFloat16: return launch.template operator()<float, c10::BFloat16>();
    case at::kHalf: return launch.template operator()<float, c10::Half>();
    default: TORCH_CHECK(false, "unsupported memory dtype ", memory_dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> max_cosine_cuda(const at::Tensor& query, const at::Tensor& memory,
                                                   const at::Tensor& count, double eps) {
  check_inputs(memory, count);
  TORCH_CHECK(query.dim() == 2 && query.is_floating_point(), "query must be a floating-point [B, D] tensor");
  TORCH_CHECK(query.device() == memory.device(), "query and memory must be on the same device");
  TORCH_CHECK(query.size(1) == memory.size(1), "query and memory must have the same number of features");
  const c10::cuda::CUDAGuard device_guard(query.device());
  const auto acc = accumulation_type(query.scalar_type(), memory.scalar_type());
  const int64_t batch = query.size(0), rows = memory.size(0), dim = query.size(1);
  const int64_t query_tiles = (batch + kQueryTile - 1) / kQueryTile;
  TORCH_CHECK(query_tiles <= kMaxGridY, "max_cosine CUDA kernel: at most ", kMaxGridY * kQueryTile, " queries");
  at::Tensor values = at::empty({batch}, query.options().dtype(acc));
  at::Tensor indices = at::empty({batch}, query.options().dtype(at::kLong));
  if (batch == 0) return {values, indices};

  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor m = readable_memory(memory, acc);
  const at::Tensor n = count.to(at::kLong);
  at::Tensor scaled = at::empty({batch, rows}, q.options());
  at::Tensor query_inv_norm = at::empty({batch}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes(acc, m.scalar_type(), [&]<typename acc_t, typename mem_t>() {
    const auto* memory_ptr = reinterpret_cast<const mem_t*>(m.const_data_ptr());
    const acc_t* query_ptr = q.const_data_ptr<acc_t>();
    const int64_t* count_ptr = n.const_data_ptr<int64_t>();
    if (rows > 0) {
      const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(query_tiles));
      auto launch = [&]<int kVec>() {
        scaled_dots_kernel<acc_t, mem_t, kVec><<<grid, kRowThreads, 0, stream>>>(
            query_ptr, memory_ptr, count_ptr, scaled.mutable_data_ptr<acc_t>(),
            query_inv_norm.mutable_data_ptr<acc_t>(), batch, rows, dim, m.stride(0), static_cast<acc_t>(1.0 / eps));
      };
      if (vector_width<mem_t>(m, {query_ptr}) > 1) {
        launch.template operator()<16 / sizeof(mem_t)>();
      } else {
        launch.template operator()<1>();
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    select_best_kernel<acc_t><<<static_cast<unsigned>(batch), kSelectThreads, 0, stream>>>(
        scaled.const_data_ptr<acc_t>(), query_inv_norm.const_data_ptr<acc_t>(), count_ptr,
        values.mutable_data_ptr<acc_t>(), indices.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

at::Tensor most_similar_index_cuda(const at::Tensor& memory, const at::Tensor& count, double eps) {
  check_inputs(memory, count);
  const c10::cuda::CUDAGuard device_guard(memory.device());
  const auto acc = accumulation_type(memory.scalar_type(), memory.scalar_type());
  const int64_t rows = memory.size(0), dim = memory.size(1);
  at::Tensor index = at::empty({}, memory.options().dtype(at::kLong));
  const at::Tensor m = readable_memory(memory, acc);
  const at::Tensor n = count.to(at::kLong);
  const auto acc_options = m.options().dtype(acc);
  at::Tensor inv_norm = at::empty({rows}, acc_options);
  at::Tensor unit_sum = at::empty({dim}, acc_options);
  at::Tensor scores = at::empty({rows}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes(acc, m.scalar_type(), [&]<typename acc_t, typename mem_t>() {
    const auto* memory_ptr = reinterpret_cast<const mem_t*>(m.const_data_ptr());
    const int64_t* count_ptr = n.const_data_ptr<int64_t>();
    if (rows > 0 && dim > 0) {
      auto launch = [&]<int kVec>() {
        const unsigned row_grid = static_cast<unsigned>(rows);
        row_inverse_norms_kernel<acc_t, mem_t, kVec><<<row_grid, kRowThreads, 0, stream>>>(
            memory_ptr, count_ptr, inv_norm.mutable_data_ptr<acc_t>(), rows, dim, m.stride(0),
            static_cast<acc_t>(1.0 / eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t features_per_block = kColumnLanes * kVec;
        const auto column_grid = static_cast<unsigned>((dim + features_per_block - 1) / features_per_block);
        unit_sum_kernel<acc_t, mem_t, kVec><<<column_grid, dim3(kColumnLanes, kRowSlots), 0, stream>>>(
            memory_ptr, count_ptr, inv_norm.const_data_ptr<acc_t>(), unit_sum.mutable_data_ptr<acc_t>(), rows,
            dim, m.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        row_scores_kernel<acc_t, mem_t, kVec><<<row_grid, kRowThreads, 0, stream>>>(
            memory_ptr, count_ptr, inv_norm.const_data_ptr<acc_t>(), unit_sum.const_data_ptr<acc_t>(),
            scores.mutable_data_ptr<acc_t>(), rows, dim, m.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vector_width<mem_t>(m, {unit_sum.const_data_ptr()}) > 1) {
        launch.template operator()<16 / sizeof(mem_t)>();
      } else {
        launch.template operator()<1>();
      }
    } else if (rows > 0) {  // D = 0: every cosine is 0, so every valid row scores 0
      scores.fill_(0);
    }
    select_best_kernel<acc_t><<<1, kSelectThreads, 0, stream>>>(scores.const_data_ptr<acc_t>(), nullptr, count_ptr,
                                                               nullptr, index.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return index;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) {
  m.impl("max_cosine", &max_cosine_cuda);
  m.impl("most_similar_index", &most_similar_index_cuda);
}
