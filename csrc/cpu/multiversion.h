// PF_MULTIVERSION: build a function for AVX-512, AVX2 and baseline x86-64
// and pick one at load time (GCC target_clones), so vectorised loops use the
// widest instructions the machine has while the binary still runs anywhere.
#pragma once

//
// PF_TARGET_V4 marks a hand-written AVX-512 kernel (x86-64-v4: AVX-512 F, DQ,
// BW, VL); callers pick it at run time with cpu_has_v4(), else the portable
// code. POSTERIORS_FAST_PORTABLE_KERNELS=1 forces the portable code (tests
// compare the two).
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define PF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PF_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define PF_HAVE_V4_KERNELS 1
#else
#define PF_MULTIVERSION
#define PF_HAVE_V4_KERNELS 0
#endif

namespace posteriors_fast {

inline bool cpu_has_v4() {
#if PF_HAVE_V4_KERNELS
  static const bool yes = [] {
    const char* portable = std::getenv("POSTERIORS_FAST_PORTABLE_KERNELS");
    if (portable != nullptr && portable[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace posteriors_fast
