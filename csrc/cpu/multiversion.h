// CPU instruction-set levels, and one build of each vectorised loop per level.
//
// Levels (x86-64 only): kAvx512 = x86-64-v4 (AVX-512 F, DQ, BW, VL), kAvx2 =
// x86-64-v3 (AVX2, FMA), kBaseline = x86-64 (SSE2). PF_ISA_VARIANTS builds a
// function from one always_inline body once per level (NAME_avx512,
// NAME_avx2, NAME_baseline, each with its `target` attribute) plus a
// dispatcher NAME(isa, args...); PF_ISA_VARIANTS_V4 builds the avx2 and
// baseline ones and sends kAvx512 to a hand-written AVX-512 kernel
// (PF_TARGET_V4: the Philox engine, the GEMM micro-kernel, sghmc's streaming
// stores).
//
// One selector for every kernel: active_isa() = min(best level this CPU has,
// a cap). The cap comes from POSTERIORS_FAST_CPU_ISA (avx512, avx2, baseline;
// unset or auto: no cap), read once at load (isa.cpp), and can be changed at
// run time with posteriors_fast._C.set_cpu_isa (module.cpp), so the tests run
// every level on one machine. At a level below avx512 our kernels take exactly
// the code a CPU of that level takes; what they call picks its own code from
// the real CPU (ATen/MKL GEMMs of syrk_ and symm_jt below avx512, glibc's
// libmvec and libm, e.g. the SSE4 log for the baseline build here, where a
// CPU without SSE4.1 gets glibc's SSE2 one). Ops read active_isa() once per
// call (a relaxed atomic load) and pass the level down; nothing checks it per
// element.
//
// Other compilers and architectures: one build of each loop, the baseline
// variant, and the only level is baseline.
#pragma once

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define PF_X86_VARIANTS 1
#define PF_HAVE_V4_KERNELS 1
#define PF_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define PF_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define PF_X86_VARIANTS 0
#define PF_HAVE_V4_KERNELS 0
#endif

// The shared body of the variants: inlined into each, so each is compiled
// (vectorised, FMA-contracted or not) for its own target.
#define PF_ALWAYS_INLINE inline __attribute__((always_inline))

#define PF_EXPAND_(...) __VA_ARGS__

// PF_EXACT_FP_BEGIN ... PF_EXACT_FP_END: no FMA contraction for the functions
// between them. With it, a + b·c rounds the product and the sum as written at
// every level, so code without reductions gives the same bits with AVX-512,
// AVX2 (both have FMA; gcc contracts by default, -ffp-contract=fast) and
// baseline x86-64 (no FMA). The contraction mode of the function being
// compiled applies to what is inlined into it, so both the callers and the
// always_inline bodies are marked.
#if defined(__clang__)
#define PF_EXACT_FP_BEGIN _Pragma("STDC FP_CONTRACT OFF")
#define PF_EXACT_FP_END _Pragma("STDC FP_CONTRACT ON")
#elif defined(__GNUC__)
#define PF_EXACT_FP_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"fp-contract=off\")")
#define PF_EXACT_FP_END _Pragma("GCC pop_options")
#else
#define PF_EXACT_FP_BEGIN
#define PF_EXACT_FP_END
#endif

// PF_ISA_VARIANTS(TEMPLATE, RET, NAME, (params...), (args...)): from
// `TEMPLATE RET NAME_body(params...)` (always_inline), defines NAME_avx512,
// NAME_avx2, NAME_baseline and the dispatcher `TEMPLATE RET NAME(Isa, params...)`.
// TEMPLATE is a template head such as `template <typename T>`, or empty.
// PF_ISA_VARIANTS_V4(TEMPLATE, RET, NAME, V4, (params...), (args...)): the
// same without NAME_avx512; the dispatcher calls V4(args...) at kAvx512.
#if PF_X86_VARIANTS
#define PF_ISA_LOWER_VARIANTS_(TEMPLATE, RET, NAME, PARAMS, ARGS)              \
  TEMPLATE PF_TARGET_V3 RET NAME##_avx2 PARAMS { return NAME##_body ARGS; } \
  TEMPLATE RET NAME##_baseline PARAMS { return NAME##_body ARGS; }
#define PF_ISA_DISPATCH_(TEMPLATE, RET, NAME, V4, PARAMS, ARGS)                    \
  TEMPLATE inline RET NAME(::posteriors_fast::Isa isa_, PF_EXPAND_ PARAMS) {      \
    if (isa_ == ::posteriors_fast::Isa::kAvx512) return V4 ARGS;                   \
    if (isa_ == ::posteriors_fast::Isa::kAvx2) return NAME##_avx2 ARGS;            \
    return NAME##_baseline ARGS;                                                   \
  }
#define PF_ISA_VARIANTS(TEMPLATE, RET, NAME, PARAMS, ARGS)                            \
  TEMPLATE PF_TARGET_V4 RET NAME##_avx512 PARAMS { return NAME##_body ARGS; }      \
  PF_ISA_LOWER_VARIANTS_(TEMPLATE, RET, NAME, PARAMS, ARGS)                         \
  PF_ISA_DISPATCH_(TEMPLATE, RET, NAME, NAME##_avx512, PARAMS, ARGS)
#define PF_ISA_VARIANTS_V4(TEMPLATE, RET, NAME, V4, PARAMS, ARGS) \
  PF_ISA_LOWER_VARIANTS_(TEMPLATE, RET, NAME, PARAMS, ARGS)       \
  PF_ISA_DISPATCH_(TEMPLATE, RET, NAME, V4, PARAMS, ARGS)
#else
#define PF_ISA_VARIANTS(TEMPLATE, RET, NAME, PARAMS, ARGS)                                                   \
  TEMPLATE RET NAME##_baseline PARAMS { return NAME##_body ARGS; }                                        \
  TEMPLATE inline RET NAME(::posteriors_fast::Isa, PF_EXPAND_ PARAMS) { return NAME##_baseline ARGS; }
#define PF_ISA_VARIANTS_V4(TEMPLATE, RET, NAME, V4, PARAMS, ARGS) PF_ISA_VARIANTS(TEMPLATE, RET, NAME, PARAMS, ARGS)
#endif

namespace posteriors_fast {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

namespace isa_detail {
// The active level (isa.cpp): written by the load-time initialiser and by
// set_isa_cap / simulate_cpu_isa, read by every op.
extern std::atomic<int> active;
}  // namespace isa_detail

// The level the kernels run at now. Read it once per op call.
inline Isa active_isa() { return static_cast<Isa>(isa_detail::active.load(std::memory_order_relaxed)); }

// isa.cpp. Names: "avx512", "avx2", "baseline"; "auto" (or "") means no cap.
const char* isa_name(Isa isa);
// Parses a level name (case-insensitive); *no_cap is set for "auto"/"".
bool parse_isa(const char* text, Isa* out, bool* no_cap);
// The best level this CPU (and this build) has; lower while simulate_cpu_isa
// pretends so (tests).
Isa supported_isa();
// Sets the cap (no_cap: none); false, and nothing changes, if `cap` is above
// supported_isa(). *previous / *previous_no_cap = the cap before, so that
// set_isa_cap(*previous, *previous_no_cap, ...) restores it.
bool set_isa_cap(Isa cap, bool no_cap, Isa* previous, bool* previous_no_cap);
// Tests: pretend the CPU has at most `level` (no_cap: the real CPU again);
// false if `level` is above what the CPU really has. *previous = the
// supported level before, *previous_real: it was the real CPU's.
bool simulate_cpu_isa(Isa level, bool no_cap, Isa* previous, bool* previous_real);
// Messages for the load of the Python module: an invalid
// POSTERIORS_FAST_CPU_ISA, or the retired POSTERIORS_FAST_PORTABLE_KERNELS being set.
const char* isa_env_problem();
const char* isa_retired_env_problem();

}  // namespace posteriors_fast
