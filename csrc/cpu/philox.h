// Standard normal draws from a counter-based generator: Philox4x32-10
// (Salmon et al. 2011) and the Box-Muller transform, one block at a time.
//
// Draw j of a stream depends only on (seed, j), so blocks can be produced in
// any order by any thread. NormalBlock<T>::kSize draws come from kLanes
// consecutive counters. float32 uses branch-free polynomial log/sin/cos; the
// float64 log/sin calls vectorise through glibc's libmvec (declared here, so
// -ffast-math, which would flush denormals process-wide, is not needed). Used
// by normal.cpp and sghmc_step.cpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "multiversion.h"

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && defined(PF_HAVE_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) float logf(float) noexcept;
__attribute__((simd("notinbranch"))) float sinf(float) noexcept;
__attribute__((simd("notinbranch"))) double log(double) noexcept;
__attribute__((simd("notinbranch"))) double sin(double) noexcept;
}
#endif

// No FMA contraction (multiversion.h): the float32 Box-Muller polynomials give
// the same bits at every ISA level, as the engines give the same words, for
// about a sixth more time per float32 draw at avx512 and a tenth at avx2
// (benchmarks/bench_normal.py).
PF_EXACT_FP_BEGIN

namespace posteriors_fast {
namespace philox {

constexpr int64_t kLanes = 64;  // Philox counters per block (4 words each)

// Two engines compute the same words (bit for bit, checked by the tests):
// words[w * kLanes + l] = word w of Philox4x32-10(counter first + l, seed).
//
// Portable: plain C++ the compiler vectorises. Avx512: the same rounds in
// AVX-512 intrinsics, on 16 counters per register with even/odd 32×32→64-bit
// multiplies, blends and three-way XORs, the kLanes / 16 register groups
// interleaved round by round (one group's round is a chain of dependent
// multiplies, shifts and XORs; four independent chains keep the vector units
// busy). gcc's vectorisation of the portable loop widens every lane to 64 bits
// instead, and runs at well under half the speed.
struct Portable {
  static constexpr bool kVectorU64ToDouble = false;  // (NormalBlock<double>)
  static inline __attribute__((always_inline)) void block(uint64_t first, uint64_t seed, uint32_t* words) {
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
};

#if PF_HAVE_V4_KERNELS
// gcc 12's own intrinsics headers trip -Wmaybe-uninitialized (their shift
// intrinsics start from _mm512_undefined_epi32); nothing here is uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
struct Avx512 {
  static constexpr bool kVectorU64ToDouble = true;  // AVX-512DQ (NormalBlock<double>)
  // Only call at the avx512 ISA level (active_isa(), multiversion.h).
  PF_TARGET_V4 static void block(uint64_t first, uint64_t seed, uint32_t* words) {
    constexpr int kGroups = kLanes / 16;
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 odd = 0xAAAA;
    __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t base = first + static_cast<uint64_t>(16 * g);
      const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
      const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
      c0[g] = _mm512_add_epi32(base_lo, lane);
      // The high word of counter base + l: one more where the low word wrapped.
      c1[g] = _mm512_mask_add_epi32(base_hi, _mm512_cmplt_epu32_mask(c0[g], base_lo), base_hi, _mm512_set1_epi32(1));
      c2[g] = _mm512_setzero_si512();
      c3[g] = _mm512_setzero_si512();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < kGroups; ++g) {
        // 64-bit products of the even lanes, then of the odd lanes shifted down.
        const __m512i even0 = _mm512_mul_epu32(c0[g], m0), odd0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[g], 32), m0);
        const __m512i even1 = _mm512_mul_epu32(c2[g], m1), odd1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[g], 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(even0, 32), odd0);
        const __m512i lo0 = _mm512_mask_blend_epi32(odd, even0, _mm512_slli_epi64(odd0, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(even1, 32), odd1);
        const __m512i lo1 = _mm512_mask_blend_epi32(odd, even1, _mm512_slli_epi64(odd1, 32));
        // 0x96: a ^ b ^ c
        c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], key0, 0x96);
        c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], key1, 0x96);
        c1[g] = lo1;
        c3[g] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int g = 0; g < kGroups; ++g) {
      _mm512_store_si512(words + 16 * g, c0[g]);
      _mm512_store_si512(words + kLanes + 16 * g, c1[g]);
      _mm512_store_si512(words + 2 * kLanes + 16 * g, c2[g]);
      _mm512_store_si512(words + 3 * kLanes + 16 * g, c3[g]);
    }
  }
};
#pragma GCC diagnostic pop
#endif

template <typename T, typename Engine = Portable>
struct NormalBlock;

// ln(x) for x in (0, 1] by exponent extraction and the atanh series of the
// mantissa (Cephes' method): |error| < 2e-7 relative, branch-free so it
// vectorises without library calls.
inline __attribute__((always_inline)) float log_poly(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = __builtin_bit_cast(float, (bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const int32_t big = m > 1.41421356f;  // move m into [√½, √2)
  m = m * (1.0f - 0.5f * static_cast<float>(big));
  e = e + big;
  const float s = (m - 1.0f) / (m + 1.0f);  // |s| < 0.1716
  const float s2 = s * s;
  const float series = s * (2.0f + s2 * (0.6666666667f + s2 * (0.4f + s2 * (0.2857142857f + s2 * 0.2222222222f))));
  return static_cast<float>(e) * 0.69314718056f + series;
}

// sin and cos of θ in [-π, π] by odd/even Taylor polynomials of θ/2 and the
// double-angle formulas: |error| < 3e-7.
inline __attribute__((always_inline)) void sincos_poly(float theta, float* s_out, float* c_out) {
  const float h = 0.5f * theta;  // |h| ≤ π/2
  const float h2 = h * h;
  const float sh = h * (1.0f + h2 * (-1.6666667e-1f + h2 * (8.3333333e-3f + h2 * (-1.9841270e-4f +
                   h2 * (2.7557319e-6f + h2 * -2.5052108e-8f)))));
  const float ch = 1.0f + h2 * (-0.5f + h2 * (4.1666667e-2f + h2 * (-1.3888889e-3f + h2 * (2.4801587e-5f +
                   h2 * (-2.7557319e-7f + h2 * 2.0876757e-9f)))));
  *s_out = 2.0f * sh * ch;
  *c_out = ch * ch - sh * sh;
}

// float32: each counter gives 4 words = 2 Box-Muller pairs = 4 draws
// (24-bit uniforms in (0, 1)). The angle is 2π(u2 − ½), uniform on (−π, π),
// so the polynomial sin/cos need no range reduction; they are faster than
// libmvec's logf/sinf, and most of the cost is Philox.
template <typename Engine>
struct NormalBlock<float, Engine> {
  static constexpr int64_t kSize = 4 * kLanes;
  // z[0 .. kSize) = draws kSize·index .. kSize·(index + 1) of the stream `seed`.
  static inline __attribute__((always_inline)) void fill(uint64_t index, uint64_t seed, float* z) {
    alignas(64) uint32_t words[4 * kLanes];
    Engine::block(index * kLanes, seed, words);
#pragma omp simd
    for (int64_t i = 0; i < 2 * kLanes; ++i) {
      const float u1 = (static_cast<float>(words[i] >> 8) + 0.5f) * 5.9604644775390625e-08f;
      const float u2 = (static_cast<float>(words[2 * kLanes + i] >> 8) + 0.5f) * 5.9604644775390625e-08f;
      const float r = std::sqrt(-2.0f * log_poly(u1));
      float sn, cs;
      sincos_poly(6.2831853071795864769f * (u2 - 0.5f), &sn, &cs);
      z[i] = r * cs;
      z[2 * kLanes + i] = r * sn;
    }
  }
};

// The 53-bit integer hi·2²¹ + (lo >> 11) as a double, exactly. x86 has no
// vector uint64 → double conversion before AVX-512DQ, and with one here gcc
// left the float64 loop below scalar at avx2 and baseline (a scalar log and two
// sin calls per pair instead of libmvec's vector ones), so the portable
// engine's builds go through 32-bit pieces, each step exact (the result is
// below 2⁵³): the same value. The AVX-512 engine keeps the one-instruction
// conversion, which the pieces would only slow down.
template <bool kVectorU64ToDouble>
inline __attribute__((always_inline)) double uint53(uint32_t hi, uint32_t lo) {
  if constexpr (kVectorU64ToDouble) {
    return static_cast<double>((static_cast<uint64_t>(hi) << 21) | (lo >> 11));
  } else {
    const double h = static_cast<double>(static_cast<int32_t>(hi ^ 0x80000000u)) + 2147483648.0;  // = hi
    return h * 2097152.0 + static_cast<double>(static_cast<int32_t>(lo >> 11));
  }
}

// float64: each counter gives 2 uniforms of 53 bits = 1 pair = 2 draws.
template <typename Engine>
struct NormalBlock<double, Engine> {
  static constexpr int64_t kSize = 2 * kLanes;
  static inline __attribute__((always_inline)) void fill(uint64_t index, uint64_t seed, double* z) {
    alignas(64) uint32_t words[4 * kLanes];
    Engine::block(index * kLanes, seed, words);
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) {
      constexpr bool u64 = Engine::kVectorU64ToDouble;
      const double u1 = (uint53<u64>(words[i], words[kLanes + i]) + 0.5) * 1.1102230246251565e-16;
      const double u2 = (uint53<u64>(words[2 * kLanes + i], words[3 * kLanes + i]) + 0.5) * 1.1102230246251565e-16;
      const double r = std::sqrt(-2.0 * log(u1));
      const double t = 6.283185307179586476925 * u2;
      z[i] = r * sin(t + 1.5707963267948966192);
      z[kLanes + i] = r * sin(t);
    }
  }
};

}  // namespace philox
}  // namespace posteriors_fast

PF_EXACT_FP_END
