// PF_MULTIVERSION: build a function for AVX-512, AVX2 and baseline x86-64
// and pick one at load time (GCC target_clones), so vectorised loops use the
// widest instructions the machine has while the binary still runs anywhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PF_MULTIVERSION
#endif
