// Declarations and input checks shared by the CPU and CUDA implementations of the zofast ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

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

}  // namespace zofast
