// The run-time ISA level of the CPU kernels (multiversion.h): detection, the
// cap from POSTERIORS_FAST_CPU_ISA read once at load, and the setters behind
// posteriors_fast._C.set_cpu_isa / _simulate_cpu_isa (module.cpp).
#include "multiversion.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>

namespace posteriors_fast {
namespace {

Isa detect_cpu() {
#if PF_X86_VARIANTS
  __builtin_cpu_init();
  // Both checks include the OS's support for the wider registers (XCR0).
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

struct State {
  Isa hardware = detect_cpu();  // the real CPU (and build)
  Isa supported = hardware;     // lower while a test simulates an older CPU
  Isa cap = Isa::kAvx512;       // kAvx512 = no cap
  std::string env_problem, retired_env_problem;
  std::mutex mutex;  // setters only; kernels read isa_detail::active

  State() {
    const char* env = std::getenv("POSTERIORS_FAST_CPU_ISA");
    Isa level;
    bool no_cap;
    if (env != nullptr && parse_isa(env, &level, &no_cap)) {
      if (!no_cap) cap = level;
    } else if (env != nullptr) {
      env_problem = std::string("POSTERIORS_FAST_CPU_ISA='") + env +
                    "' is not one of avx512, avx2, baseline, auto; ignored, the CPU kernels run at the best level "
                    "this CPU has (" + isa_name(hardware) + ")";
    }
    if (std::getenv("POSTERIORS_FAST_PORTABLE_KERNELS") != nullptr) {
      retired_env_problem =
          "POSTERIORS_FAST_PORTABLE_KERNELS is no longer read; set POSTERIORS_FAST_CPU_ISA=avx2 (or baseline) to "
          "run the kernels that CPUs without AVX-512 take";
    }
  }
  int level() const { return static_cast<int>(std::min(supported, cap)); }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

namespace isa_detail {
std::atomic<int> active{state().level()};
}  // namespace isa_detail

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

bool parse_isa(const char* text, Isa* out, bool* no_cap) {
  std::string s(text);
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  *no_cap = false;
  if (s == "avx512") {
    *out = Isa::kAvx512;
  } else if (s == "avx2") {
    *out = Isa::kAvx2;
  } else if (s == "baseline") {
    *out = Isa::kBaseline;
  } else if (s == "auto" || s.empty()) {
    *out = Isa::kAvx512;
    *no_cap = true;
  } else {
    return false;
  }
  return true;
}

Isa supported_isa() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.supported;
}

bool set_isa_cap(Isa cap, bool no_cap, Isa* previous, bool* previous_no_cap) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  *previous = s.cap;
  *previous_no_cap = s.cap == Isa::kAvx512;  // the top level caps nothing
  if (!no_cap && cap > s.supported) return false;
  s.cap = no_cap ? Isa::kAvx512 : cap;
  isa_detail::active.store(s.level(), std::memory_order_relaxed);
  return true;
}

bool simulate_cpu_isa(Isa level, bool no_cap, Isa* previous, bool* previous_real) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  *previous = s.supported;
  *previous_real = s.supported == s.hardware;
  if (!no_cap && level > s.hardware) return false;
  s.supported = no_cap ? s.hardware : level;
  isa_detail::active.store(s.level(), std::memory_order_relaxed);
  return true;
}

const char* isa_env_problem() { return state().env_problem.c_str(); }
const char* isa_retired_env_problem() { return state().retired_env_problem.c_str(); }

}  // namespace posteriors_fast
