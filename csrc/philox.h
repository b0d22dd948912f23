// The zofast noise contract, shared by the CPU (C++) and CUDA code.
//
// normal(seed, i): c = i / 4, lane = i % 4,
//   (x0, x1, x2, x3) = Philox4x32-10(counter = (lo32(c), hi32(c), 0, 0), key = (lo32(seed), hi32(seed)))
//   u_j = uniform(x_j);  (n0, n1) = box_muller(u0, u1);  (n2, n3) = box_muller(u2, u3)
//   normal(seed, i) = n_lane
// This is element `lane` of Triton's tl.randn4x(seed, c); kernels/philox.py spells out the same maths.
//
// Stochastic rounding of a float32 result x at global (row r, column c) with a round seed:
//   word = word (c % 4) of Philox4x32-10(counter = (lo32(c / 4), hi32(c / 4), lo32(r), hi32(r)),
//                                         key = (lo32(seed), hi32(seed)))
//   bfloat16: NaN -> 0x7FFF; else the high half of bits(x) + (word & 0xFFFF)
//   float16:  NaN -> 0x7FFF; |x| >= 2^-14: (bits(x) + (word & 0x1FFF)) & ~0x1FFF, converted (exact,
//             beyond 65504 -> inf); |x| < 2^-14: a = fl(|x| + 2^-14), a' = (bits(a) + (word & 0x1FFF))
//             & ~0x1FFF, result (a' - 2^-14) with x's sign (exact)
// (matrix ops: r, c = row_offset + i, col_offset + j; full-rank ops: r = 0, c = offset + i).
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define ZOFAST_HD __host__ __device__ __forceinline__
#else
#define ZOFAST_HD inline
#endif

namespace zofast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (Weyl sequence)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // 2^-31, as Triton rounds it
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;  // clamp before log: tails end near 5.68 sigma

struct Words4 {
  uint32_t x[4];
};

ZOFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

ZOFAST_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Words4{{c0, c1, c2, c3}};
}

ZOFAST_HD Words4 philox_block(uint64_t seed, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// 31 random bits -> [0, 1): the int32 view, bit-flipped when negative.
ZOFAST_HD float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

ZOFAST_HD void box_muller(float u1, float u2, float& n1, float& n2) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float theta = kTwoPi * u2;
  const float radius = sqrtf(-2.0f * logf(u1));
  n1 = radius * cosf(theta);
  n2 = radius * sinf(theta);
}

// The four normals of counter block `block`: indices 4*block .. 4*block+3 of stream `seed`.
ZOFAST_HD void normal4(uint64_t seed, uint64_t block, float out[4]) {
  const Words4 w = philox_block(seed, block);
  box_muller(uint_to_uniform(w.x[0]), uint_to_uniform(w.x[1]), out[0], out[1]);
  box_muller(uint_to_uniform(w.x[2]), uint_to_uniform(w.x[3]), out[2], out[3]);
}

ZOFAST_HD float normal_at(uint64_t seed, uint64_t index) {
  float n[4];
  normal4(seed, index >> 2, n);
  return n[index & 3];
}

// The rounding words of columns 4*col_block .. 4*col_block + 3 of row `row`.
ZOFAST_HD Words4 round_block(uint64_t seed, uint64_t row, uint64_t col_block) {
  return philox4x32_10(static_cast<uint32_t>(col_block), static_cast<uint32_t>(col_block >> 32),
                       static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

ZOFAST_HD uint32_t round_word(uint64_t seed, uint64_t row, uint64_t col) {
  return round_block(seed, row, col >> 2).x[col & 3];
}

ZOFAST_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

ZOFAST_HD float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

constexpr uint16_t kCanonicalNaN16 = 0x7FFFu;  // what the GPU's float32 -> bf16 / fp16 gives NaN

// x rounded stochastically to bfloat16 with `word`: the bf16 bit pattern.
ZOFAST_HD uint16_t stochastic_bf16(float x, uint32_t word) {
  const uint32_t bits = float_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return kCanonicalNaN16;
  return static_cast<uint16_t>((bits + (word & 0xFFFFu)) >> 16);
}

// x rounded stochastically to float16 with `word`: the fp16 bit pattern.
ZOFAST_HD uint16_t stochastic_fp16(float x, uint32_t word) {
  const uint32_t bits = float_bits(x), mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return kCanonicalNaN16;
  const uint32_t sign = (bits >> 16) & 0x8000u;
  if (mag >= 0x38800000u) {  // fp16's normal range: keep 11 significant bits
    const uint32_t high = (mag + (word & 0x1FFFu)) & 0xFFFFE000u;
    return static_cast<uint16_t>(sign | (high >= 0x47800000u ? 0x7C00u : (high >> 13) - 0x1C000u));
  }
  // Subnormal: a = |x| + 2^-14 in [2^-14, 2^-13] carries the fp16 step 2^-24 at bit 13.
  const uint32_t a = float_bits(bits_float(mag) + 6.103515625e-05f);
  return static_cast<uint16_t>(sign | ((((a + (word & 0x1FFFu)) & 0xFFFFE000u) - 0x38800000u) >> 13));
}

}  // namespace zofast
