// CPU implementations of the zofast ops and the operator schema (torch.ops.zofast.*).
// Built with -ffp-contract=off: the only fused multiply-adds are the explicit std::fma calls,
// which every backend performs in the same order.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"
#include "philox.h"

namespace zofast {
namespace {

constexpr int64_t kGrain = 2048;

// acc[j] = fma(a, b[j], acc[j]): the inner loop of lowrank_apply_. Cloned for CPUs with FMA units
// (chosen at load time), where it vectorises (17x faster measured on 2 EPYC cores); the default
// clone calls libm's fmaf, which rounds the same way.
__attribute__((target_clones("fma", "default"))) void fma_row(float* acc, float a,
                                                                       const float* b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = std::fma(a, b[j], acc[j]);
}

// bf16 rows to and from float32 with plain bit operations, the same values as c10::BFloat16's
// conversions (widening is exact; narrowing rounds to nearest even, NaN -> 0x7FC0), written so
// that the compiler vectorises them; c10's per-element conversion does not vectorise and was
// the bound of bf16 lowrank_ (36 % of copy against 97 % for fp32, bench/results/cpu-...-openmp).
__attribute__((target_clones("avx2", "default"))) void widen_bf16_row(
    float* out, const uint16_t* in, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = uint32_t(in[j]) << 16;
    std::memcpy(out + j, &bits, sizeof(bits));
  }
}

__attribute__((target_clones("avx2", "default"))) void narrow_bf16_row(
    uint16_t* out, const float* in, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, in + j, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    out[j] = in[j] != in[j] ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
}

template <typename scalar_t>
void widen_row(float* out, const scalar_t* in, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    widen_bf16_row(out, reinterpret_cast<const uint16_t*>(in), n);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = float(in[j]);
  }
}

template <typename scalar_t>
void narrow_row(scalar_t* out, const float* in, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    narrow_bf16_row(reinterpret_cast<uint16_t*>(out), in, n);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = scalar_t(in[j]);
  }
}

// A row rounded stochastically: element j is global column col0 + j of global row `row`; one
// Philox block per four columns.
template <typename scalar_t>
void narrow_row_stochastic(scalar_t* out, const float* in, int64_t n, uint64_t seed, uint64_t row,
                           uint64_t col0) {
  int64_t j = 0;
  while (j < n) {
    const uint64_t col = col0 + uint64_t(j);
    const Words4 r = round_block(seed, row, col >> 2);
    for (uint64_t lane = col & 3; lane < 4 && j < n; ++lane, ++j) {
      out[j] = stochastic_store<scalar_t>(in[j], r.x[lane]);
    }
  }
}

void scale_row(float* acc, float a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = a * acc[j];
}

// The optional round seed (ignored for float32 weights) and weight scale of a pass, read on the
// host from their CPU tensors.
struct Extras {
  bool stochastic = false;
  uint64_t round_seed = 0;
  bool scaled = false;
  float w_scale = 1.0f;
};

Extras read_extras(const std::optional<at::Tensor>& round_seed,
                   const std::optional<at::Tensor>& w_scale, const at::Tensor& w) {
  check_extras(round_seed, w_scale, w);
  Extras e;
  e.stochastic = round_seed.has_value() && w.scalar_type() != at::kFloat;
  if (e.stochastic) e.round_seed = uint64_t(round_seed->contiguous().data_ptr<int64_t>()[0]);
  e.scaled = w_scale.has_value();
  if (e.scaled) e.w_scale = w_scale->contiguous().data_ptr<float>()[0];
  return e;
}

at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "counters must be an (N, 4) int64 tensor");
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, c.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* w = src + 4 * i;
      const Words4 r = philox4x32_10(uint32_t(w[0]), uint32_t(w[1]), uint32_t(w[2]),
                                     uint32_t(w[3]), uint32_t(k0), uint32_t(k1));
      for (int j = 0; j < 4; ++j) dst[4 * i + j] = int64_t(r.x[j]);
    }
  });
  return out;
}

at::Tensor sample_cpu(const at::Tensor& offsets, int64_t seed, bool normal) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  const at::Tensor o = offsets.contiguous();
  at::Tensor out = at::empty(o.sizes(), o.options().dtype(at::kFloat));
  const int64_t* src = o.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const uint64_t s = uint64_t(seed);
  at::parallel_for(0, o.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t index = uint64_t(src[i]);
      if (normal) {
        dst[i] = normal_at(s, index);
      } else {
        dst[i] = uint_to_uniform(philox_block(s, index >> 2).x[index & 3]);
      }
    }
  });
  return out;
}

// out[i] = scale * normal(seed, offset + i); seed and scale are one-element tensors.
void noise_cpu(at::Tensor& out, const at::Tensor& seed_t, const at::Tensor& scale_t, int64_t offset) {
  check_float32(out, "out", out);
  check_terms(seed_t, scale_t, out);
  TORCH_CHECK(seed_t.numel() == 1, "noise_ takes one seed");
  float* dst = out.data_ptr<float>();
  const int64_t n = out.numel();
  const uint64_t first = uint64_t(offset) >> 2, last = (uint64_t(offset) + n + 3) >> 2;
  const uint64_t seed = uint64_t(seed_t.data_ptr<int64_t>()[0]);
  const float s = scale_t.data_ptr<float>()[0];
  at::parallel_for(0, int64_t(last - first), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint64_t block = first + b;
      float z[4];
      normal4(uint64_t(seed), block, z);
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t i = int64_t(block * 4 + lane) - offset;
        if (i >= 0 && i < n) dst[i] = s * z[lane];
      }
    }
  });
}

// out[i] = round(fma(scale_T, z_T, ... fma(scale_1, z_1, a·float(w[i])))), z_t = normal(seed_t,
// offset + i); the multiply by the weight scale a only with one, the rounding stochastic (row 0,
// column offset + i) with a round seed. out may be w.
void gaussian_into_cpu(const at::Tensor& w, at::Tensor& out, const at::Tensor& seeds,
                       const at::Tensor& scales, int64_t offset,
                       const std::optional<at::Tensor>& round_seed,
                       const std::optional<at::Tensor>& w_scale) {
  check_weight(w, "w");
  check_out(w, out);
  check_terms(seeds, scales, w);
  const Extras extras = read_extras(round_seed, w_scale, w);
  const int64_t n = w.numel(), terms = seeds.numel();
  const int64_t* seed = seeds.data_ptr<int64_t>();
  const float* scale = scales.data_ptr<float>();
  const uint64_t first = uint64_t(offset) >> 2, last = (uint64_t(offset) + n + 3) >> 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "gaussian_", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(last - first), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const uint64_t block = first + b;
        const int64_t base = int64_t(block * 4) - offset;
        float acc[4];
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = base + lane;
          acc[lane] = (i >= 0 && i < n) ? float(src[i]) : 0.0f;
          if (extras.scaled) acc[lane] = extras.w_scale * acc[lane];
        }
        float z[4];
        for (int64_t t = 0; t < terms; ++t) {
          // A term on the previous term's seed (MeZO's restore + update) reuses its normals.
          if (t == 0 || seed[t] != seed[t - 1]) normal4(uint64_t(seed[t]), block, z);
          for (int lane = 0; lane < 4; ++lane) acc[lane] = std::fma(scale[t], z[lane], acc[lane]);
        }
        Words4 words{};
        if (extras.stochastic) words = round_block(extras.round_seed, 0, block);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = base + lane;
          if (i < 0 || i >= n) continue;
          dst[i] = extras.stochastic ? stochastic_store<scalar_t>(acc[lane], words.x[lane])
                                     : scalar_t(acc[lane]);
        }
      }
    });
  });
}

void gaussian_cpu(at::Tensor& w, const at::Tensor& seeds, const at::Tensor& scales, int64_t offset) {
  gaussian_into_cpu(w, w, seeds, scales, offset, std::nullopt, std::nullopt);
}

// out = w + sum_t u_t v_t^T with u: (T, R, m), v: (T, R, n); per element the fmas run t-major,
// k-minor, on a·float(w) with a weight scale; the rounding is stochastic with a round seed (the
// element's global row row_offset + i and column col_offset + j). out may be w.
void lowrank_apply_into_cpu(const at::Tensor& w, at::Tensor& out, const at::Tensor& u,
                            const at::Tensor& v, int64_t row_offset, int64_t col_offset,
                            const std::optional<at::Tensor>& round_seed,
                            const std::optional<at::Tensor>& w_scale) {
  check_factors(w, u, v);
  check_out(w, out);
  const Extras extras = read_extras(round_seed, w_scale, w);
  const int64_t m = w.size(0), n = w.size(1), terms = u.size(0), rank = u.size(1);
  const float* pu = u.data_ptr<float>();
  const float* pv = v.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "lowrank_apply_", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain * 16 / std::max<int64_t>(n, 1));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(n);
      for (int64_t i = begin; i < end; ++i) {
        widen_row(acc.data(), src + i * n, n);
        if (extras.scaled) scale_row(acc.data(), extras.w_scale, n);
        for (int64_t t = 0; t < terms; ++t) {
          for (int64_t k = 0; k < rank; ++k) {
            const float a = pu[(t * rank + k) * m + i];
            const float* b = pv + (t * rank + k) * n;
            fma_row(acc.data(), a, b, n);
          }
        }
        if (extras.stochastic) {
          narrow_row_stochastic(dst + i * n, acc.data(), n, extras.round_seed,
                                uint64_t(row_offset + i), uint64_t(col_offset));
        } else {
          narrow_row(dst + i * n, acc.data(), n);
        }
      }
    });
  });
}

void lowrank_apply_cpu(at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
  lowrank_apply_into_cpu(w, w, u, v, 0, 0, std::nullopt, std::nullopt);
}

}  // namespace

TORCH_LIBRARY(zofast, m) {
  m.def("philox4x32(Tensor counters, int k0, int k1) -> Tensor");
  m.def("sample(Tensor offsets, int seed, bool normal) -> Tensor");
  m.def("noise_(Tensor(a!) out, Tensor seed, Tensor scale, int offset) -> ()");
  m.def("gaussian_(Tensor(a!) w, Tensor seeds, Tensor scales, int offset) -> ()");
  m.def("lowrank_apply_(Tensor(a!) w, Tensor u, Tensor v) -> ()");
  // The same passes with w only read and the result in out (which may be w), an optional round
  // seed (stochastic rounding, philox.h) and weight scale (acc starts as a * float(w)).
  m.def(
      "gaussian_into(Tensor w, Tensor(a!) out, Tensor seeds, Tensor scales, int offset, "
      "Tensor? round_seed=None, Tensor? w_scale=None) -> ()");
  m.def(
      "lowrank_apply_into(Tensor w, Tensor(a!) out, Tensor u, Tensor v, int row_offset=0, "
      "int col_offset=0, Tensor? round_seed=None, Tensor? w_scale=None) -> ()");
}

TORCH_LIBRARY_IMPL(zofast, CPU, m) {
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("sample", &sample_cpu);
  m.impl("noise_", &noise_cpu);
  m.impl("gaussian_", &gaussian_cpu);
  m.impl("lowrank_apply_", &lowrank_apply_cpu);
  m.impl("gaussian_into", &gaussian_into_cpu);
  m.impl("lowrank_apply_into", &lowrank_apply_into_cpu);
}

}  // namespace zofast

// The Python module only exists so that `import zofast._C` loads the library and its operators.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("has_cuda") = bool(ZOFAST_WITH_CUDA);
}
