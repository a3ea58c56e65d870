// Standard normal draws from a counter-based generator: Philox4x32-10
// (Salmon et al. 2011) and the Box-Muller transform, one block at a time.
//
// Draw j of a stream depends only on (seed, j), so blocks can be produced in
// any order by any thread. NormalBlock<T>::kSize draws come from kLanes
// consecutive counters. The log/sin calls vectorise through glibc's libmvec
// (declared here, so -ffast-math, which would flush denormals process-wide,
// is not needed). Used by normal.cpp and sghmc_step.cpp.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && defined(PF_HAVE_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) float logf(float) noexcept;
__attribute__((simd("notinbranch"))) float sinf(float) noexcept;
__attribute__((simd("notinbranch"))) double log(double) noexcept;
__attribute__((simd("notinbranch"))) double sin(double) noexcept;
}
#endif

namespace posteriors_fast {
namespace philox {

constexpr int64_t kLanes = 64;  // Philox counters per block (4 words each)

// words[w * kLanes + l] = word w of Philox4x32-10(counter first + l, seed).
inline __attribute__((always_inline)) void block(uint64_t first, uint64_t seed, uint32_t* words) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t ctr = first + static_cast<uint64_t>(l);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    words[l] = c0;
    words[kLanes + l] = c1;
    words[2 * kLanes + l] = c2;
    words[3 * kLanes + l] = c3;
  }
}

template <typename T>
struct NormalBlock;

// float32: each counter gives 4 words = 2 Box-Muller pairs = 4 draws
// (24-bit uniforms in (0, 1)).
template <>
struct NormalBlock<float> {
  static constexpr int64_t kSize = 4 * kLanes;
  // z[0 .. kSize) = draws kSize·index .. kSize·(index + 1) of the stream `seed`.
  static inline __attribute__((always_inline)) void fill(uint64_t index, uint64_t seed, float* z) {
    alignas(64) uint32_t words[4 * kLanes];
    block(index * kLanes, seed, words);
#pragma omp simd
    for (int64_t i = 0; i < 2 * kLanes; ++i) {
      const float u1 = (static_cast<float>(words[i] >> 8) + 0.5f) * 5.9604644775390625e-08f;
      const float u2 = (static_cast<float>(words[2 * kLanes + i] >> 8) + 0.5f) * 5.9604644775390625e-08f;
      const float r = std::sqrt(-2.0f * logf(u1));
      const float t = 6.2831853071795864769f * u2;
      z[i] = r * sinf(t + 1.5707963267948966f);  // cos, written as sin so both calls vectorise
      z[2 * kLanes + i] = r * sinf(t);
    }
  }
};

// float64: each counter gives 2 uniforms of 53 bits = 1 pair = 2 draws.
template <>
struct NormalBlock<double> {
  static constexpr int64_t kSize = 2 * kLanes;
  static inline __attribute__((always_inline)) void fill(uint64_t index, uint64_t seed, double* z) {
    alignas(64) uint32_t words[4 * kLanes];
    block(index * kLanes, seed, words);
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) {
      const uint64_t a = (static_cast<uint64_t>(words[i]) << 21) ^ (words[kLanes + i] >> 11);
      const uint64_t b = (static_cast<uint64_t>(words[2 * kLanes + i]) << 21) ^ (words[3 * kLanes + i] >> 11);
      const double u1 = (static_cast<double>(a & ((1ull << 53) - 1)) + 0.5) * 1.1102230246251565e-16;
      const double u2 = (static_cast<double>(b & ((1ull << 53) - 1)) + 0.5) * 1.1102230246251565e-16;
      const double r = std::sqrt(-2.0 * log(u1));
      const double t = 6.283185307179586476925 * u2;
      z[i] = r * sin(t + 1.5707963267948966192);
      z[kLanes + i] = r * sin(t);
    }
  }
};

}  // namespace philox
}  // namespace posteriors_fast
