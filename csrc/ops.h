// Declarations and input checks shared by the CPU and CUDA implementations of the zofast ops.
#pragma once

#include <optional>
#include <type_traits>

#include <torch/library.h>
#include <ATen/ATen.h>

#include "philox.h"

namespace zofast {

inline void check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 ||
                  w.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
}

inline void check_float32(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

inline void check_terms(const at::Tensor& seeds, const at::Tensor& scales, const at::Tensor& w) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1 && seeds.is_contiguous(),
              "seeds must be a contiguous 1-D int64 tensor");
  check_float32(scales, "scales", w);
  TORCH_CHECK(seeds.device() == w.device(), "seeds must be on ", w.device());
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == seeds.numel(),
              "scales must be 1-D with one entry per seed");
}

// u: (T, R, m), v: (T, R, n) float32 factors of w: (m, n) += sum_t u_t v_t^T (column k of u_t
// contiguous, so that loads over rows / columns coalesce).
inline void check_factors(const at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
  check_weight(w, "w");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D, got ", w.dim(), " dims");
  check_float32(u, "u", w);
  check_float32(v, "v", w);
  TORCH_CHECK(u.dim() == 3 && v.dim() == 3 && u.size(0) == v.size(0) && u.size(1) == v.size(1),
              "u and v must be (T, R, m) and (T, R, n)");
  TORCH_CHECK(u.size(2) == w.size(0) && v.size(2) == w.size(1),
              "factor shapes ", u.sizes(), " and ", v.sizes(), " do not match w ", w.sizes());
}

// out: where the result goes (w is only read; out may be w itself), like w.
inline void check_out(const at::Tensor& w, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == w.scalar_type() && out.sizes() == w.sizes() &&
                  out.device() == w.device() && out.is_contiguous(),
              "out must be a contiguous ", w.scalar_type(), " tensor of shape ", w.sizes(), " on ",
              w.device());
}

// round_seed: one int64 element (the uint64 seed's bits); w_scale: one float32 element; on w's
// device, read there (graph-safe).
inline void check_extras(const std::optional<at::Tensor>& round_seed,
                         const std::optional<at::Tensor>& w_scale, const at::Tensor& w) {
  if (round_seed.has_value()) {
    TORCH_CHECK(round_seed->scalar_type() == at::kLong && round_seed->numel() == 1 &&
                    round_seed->device() == w.device(),
                "round_seed must be one int64 element on ", w.device());
  }
  if (w_scale.has_value()) {
    TORCH_CHECK(w_scale->scalar_type() == at::kFloat && w_scale->numel() == 1 &&
                    w_scale->device() == w.device(),
                "w_scale must be one float32 element on ", w.device());
  }
}

// x rounded stochastically to scalar_t with `word` (philox.h); float32 stores x.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t stochastic_store(float x, uint32_t word) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(stochastic_bf16(x, word), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(stochastic_fp16(x, word), c10::Half::from_bits());
  } else {
    return scalar_t(x);
  }
}

}  // namespace zofast
