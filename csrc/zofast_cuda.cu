// CUDA implementations of the zofast ops. Built with -ftz=true -prec-sqrt=false (and never fast
// math) so that logf/cosf/sinf/sqrtf round exactly as Triton's libdevice calls do: the normals are
// bit-identical to the Triton kernels'. Seeds and scales are read from device memory, so the ops
// can be captured in a CUDA graph and replayed with new seeds written into the same tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"
#include "philox.h"

namespace zofast {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) { return (work + kThreads - 1) / kThreads; }

__global__ void philox_kernel(const int64_t* counters, int64_t* out, int64_t n, uint32_t k0,
                              uint32_t k1) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t* c = counters + 4 * i;
  const Words4 r = philox4x32_10(uint32_t(c[0]), uint32_t(c[1]), uint32_t(c[2]), uint32_t(c[3]), k0, k1);
  for (int j = 0; j < 4; ++j) out[4 * i + j] = int64_t(r.x[j]);
}

__global__ void sample_kernel(const int64_t* offsets, float* out, int64_t n, uint64_t seed,
                              bool normal) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t index = uint64_t(offsets[i]);
  out[i] = normal ? normal_at(seed, index) : uint_to_uniform(philox_block(seed, index >> 2).x[index & 3]);
}

__global__ void noise_kernel(float* out, int64_t n, const int64_t* seed, const float* scale_ptr,
                             int64_t offset, int64_t n_blocks) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n_blocks) return;
  const uint64_t block = (uint64_t(offset) >> 2) + b;
  const float scale = *scale_ptr;
  float z[4];
  normal4(uint64_t(*seed), block, z);
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = int64_t(block * 4 + lane) - offset;
    if (i >= 0 && i < n) out[i] = scale * z[lane];
  }
}

// round_seed (stochastic rounding, nullptr: to nearest even) and w_scale (nullptr: none) are
// device pointers to one element; out may be w.
template <typename scalar_t>
__global__ void gaussian_kernel(const scalar_t* w, scalar_t* out, int64_t n, const int64_t* seeds,
                                const float* scales, int64_t terms, int64_t offset,
                                int64_t n_blocks, const int64_t* round_seed, const float* w_scale) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n_blocks) return;
  const uint64_t block = (uint64_t(offset) >> 2) + b;
  const int64_t base = int64_t(block * 4) - offset;
  float acc[4];
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = base + lane;
    acc[lane] = (i >= 0 && i < n) ? float(w[i]) : 0.0f;
    if (w_scale != nullptr) acc[lane] = __fmul_rn(*w_scale, acc[lane]);
  }
  float z[4];
  for (int64_t t = 0; t < terms; ++t) {
    // A term on the previous term's seed (MeZO's restore + update) reuses its normals.
    if (t == 0 || seeds[t] != seeds[t - 1]) normal4(uint64_t(seeds[t]), block, z);
    const float s = scales[t];
    for (int lane = 0; lane < 4; ++lane) acc[lane] = fmaf(s, z[lane], acc[lane]);
  }
  Words4 words{};
  if (round_seed != nullptr) words = round_block(uint64_t(*round_seed), 0, block);
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = base + lane;
    if (i < 0 || i >= n) continue;
    out[i] = round_seed != nullptr ? stochastic_store<scalar_t>(acc[lane], words.x[lane])
                                   : scalar_t(acc[lane]);
  }
}

template <typename scalar_t>
__global__ void lowrank_apply_kernel(const scalar_t* w, scalar_t* out, const float* u,
                                     const float* v, int64_t m, int64_t n, int64_t terms,
                                     int64_t rank, const float* w_scale) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= m * n) return;
  const int64_t i = idx / n, j = idx % n;
  float acc = float(w[idx]);
  if (w_scale != nullptr) acc = __fmul_rn(*w_scale, acc);
  for (int64_t t = 0; t < terms; ++t) {
    for (int64_t k = 0; k < rank; ++k) acc = fmaf(u[(t * rank + k) * m + i], v[(t * rank + k) * n + j], acc);
  }
  out[idx] = scalar_t(acc);
}

// Stochastic rounding: a thread per row and group of four global columns (one Philox block),
// groups_per_row of them covering columns col_offset .. col_offset + n - 1.
template <typename scalar_t>
__global__ void lowrank_apply_stochastic_kernel(const scalar_t* w, scalar_t* out, const float* u,
                                                const float* v, int64_t m, int64_t n,
                                                int64_t terms, int64_t rank, int64_t row_offset,
                                                int64_t col_offset, int64_t groups_per_row,
                                                const int64_t* round_seed, const float* w_scale) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= m * groups_per_row) return;
  const int64_t i = idx / groups_per_row;
  const uint64_t block = (uint64_t(col_offset) >> 2) + uint64_t(idx % groups_per_row);
  const Words4 words = round_block(uint64_t(*round_seed), uint64_t(row_offset + i), block);
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t j = int64_t(block * 4 + lane) - col_offset;
    if (j < 0 || j >= n) continue;
    float acc = float(w[i * n + j]);
    if (w_scale != nullptr) acc = __fmul_rn(*w_scale, acc);
    for (int64_t t = 0; t < terms; ++t) {
      for (int64_t k = 0; k < rank; ++k) acc = fmaf(u[(t * rank + k) * m + i], v[(t * rank + k) * n + j], acc);
    }
    out[i * n + j] = stochastic_store<scalar_t>(acc, words.x[lane]);
  }
}

const int64_t* round_seed_ptr(const std::optional<at::Tensor>& round_seed, const at::Tensor& w) {
  if (!round_seed.has_value() || w.scalar_type() == at::kFloat) return nullptr;  // nothing to round
  return round_seed->data_ptr<int64_t>();
}

const float* w_scale_ptr(const std::optional<at::Tensor>& w_scale) {
  return w_scale.has_value() ? w_scale->data_ptr<float>() : nullptr;
}

at::Tensor philox4x32_cuda(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "counters must be an (N, 4) int64 tensor");
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  philox_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n, uint32_t(k0), uint32_t(k1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sample_cuda(const at::Tensor& offsets, int64_t seed, bool normal) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  const c10::cuda::CUDAGuard guard(offsets.device());
  const at::Tensor o = offsets.contiguous();
  at::Tensor out = at::empty(o.sizes(), o.options().dtype(at::kFloat));
  const int64_t n = o.numel();
  if (n == 0) return out;
  sample_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      o.data_ptr<int64_t>(), out.data_ptr<float>(), n, uint64_t(seed), normal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void noise_cuda(at::Tensor& out, const at::Tensor& seed, const at::Tensor& scale, int64_t offset) {
  check_float32(out, "out", out);
  check_terms(seed, scale, out);
  TORCH_CHECK(seed.numel() == 1, "noise_ takes one seed");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  const int64_t n_blocks = int64_t(((uint64_t(offset) + n + 3) >> 2) - (uint64_t(offset) >> 2));
  if (n == 0) return;
  noise_kernel<<<blocks_for(n_blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, seed.data_ptr<int64_t>(), scale.data_ptr<float>(), offset, n_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gaussian_into_cuda(const at::Tensor& w, at::Tensor& out, const at::Tensor& seeds,
                        const at::Tensor& scales, int64_t offset,
                        const std::optional<at::Tensor>& round_seed,
                        const std::optional<at::Tensor>& w_scale) {
  check_weight(w, "w");
  check_out(w, out);
  check_terms(seeds, scales, w);
  check_extras(round_seed, w_scale, w);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.numel();
  const int64_t n_blocks = int64_t(((uint64_t(offset) + n + 3) >> 2) - (uint64_t(offset) >> 2));
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "gaussian_", [&] {
    gaussian_kernel<scalar_t><<<blocks_for(n_blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, seeds.data_ptr<int64_t>(),
        scales.data_ptr<float>(), seeds.numel(), offset, n_blocks, round_seed_ptr(round_seed, w),
        w_scale_ptr(w_scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gaussian_cuda(at::Tensor& w, const at::Tensor& seeds, const at::Tensor& scales, int64_t offset) {
  gaussian_into_cuda(w, w, seeds, scales, offset, std::nullopt, std::nullopt);
}

void lowrank_apply_into_cuda(const at::Tensor& w, at::Tensor& out, const at::Tensor& u,
                             const at::Tensor& v, int64_t row_offset, int64_t col_offset,
                             const std::optional<at::Tensor>& round_seed,
                             const std::optional<at::Tensor>& w_scale) {
  check_factors(w, u, v);
  check_out(w, out);
  check_extras(round_seed, w_scale, w);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t m = w.size(0), n = w.size(1);
  if (m * n == 0) return;
  const int64_t* seed = round_seed_ptr(round_seed, w);
  const int64_t groups = int64_t(((uint64_t(col_offset) + n + 3) >> 2) - (uint64_t(col_offset) >> 2));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "lowrank_apply_", [&] {
    if (seed == nullptr) {
      lowrank_apply_kernel<scalar_t><<<blocks_for(m * n), kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), u.data_ptr<float>(), v.data_ptr<float>(),
          m, n, u.size(0), u.size(1), w_scale_ptr(w_scale));
    } else {
      lowrank_apply_stochastic_kernel<scalar_t><<<blocks_for(m * groups), kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), u.data_ptr<float>(), v.data_ptr<float>(),
          m, n, u.size(0), u.size(1), row_offset, col_offset, groups, seed, w_scale_ptr(w_scale));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lowrank_apply_cuda(at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
  lowrank_apply_into_cuda(w, w, u, v, 0, 0, std::nullopt, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(zofast, CUDA, m) {
  m.impl("philox4x32", &philox4x32_cuda);
  m.impl("sample", &sample_cuda);
  m.impl("noise_", &noise_cuda);
  m.impl("gaussian_", &gaussian_cuda);
  m.impl("lowrank_apply_", &lowrank_apply_cuda);
  m.impl("gaussian_into", &gaussian_into_cuda);
  m.impl("lowrank_apply_into", &lowrank_apply_into_cuda);
}

}  // namespace zofast
