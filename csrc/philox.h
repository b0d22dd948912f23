// The zofast noise contract, shared by the CPU (C++) and CUDA code.
//
// normal(seed, i): c = i / 4, lane = i % 4,
//   (x0, x1, x2, x3) = Philox4x32-10(counter = (lo32(c), hi32(c), 0, 0), key = (lo32(seed), hi32(seed)))
//   u_j = uniform(x_j);  (n0, n1) = box_muller(u0, u1);  (n2, n3) = box_muller(u2, u3)
//   normal(seed, i) = n_lane
// This is element `lane` of Triton's tl.randn4x(seed, c); kernels/philox.py spells out the same maths.
#pragma once

#include <cstdint>
#include <cmath>

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

}  // namespace zofast
