#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace kdfast {
namespace {
std::atomic<int> g_cap{-2};  // -2: not yet read from the environment

int env_cap() {
  const char* s = std::getenv("KDFAST_CPU_ISA");
  if (!s || !*s) return -1;
  return isa_from_name(s);  // unknown names are rejected in Python first
}
}  // namespace

Isa hardware_isa() {
#if KDFAST_HAVE_X86_PATHS
  static const Isa hw = [] {
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (avx512 && __builtin_cpu_supports("avx512vnni")) return Isa::AVX512_VNNI;
    if (avx512) return Isa::AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::AVX2;
    return Isa::Scalar;
  }();
  return hw;
#else
  return Isa::Scalar;
#endif
}

void set_max_isa(int level) { g_cap.store(level); }

int max_isa() {
  int cap = g_cap.load();
  if (cap == -2) {
    cap = env_cap();
    g_cap.store(cap);
  }
  return cap;
}

Isa cpu_isa() {
  int hw = static_cast<int>(hardware_isa());
  int cap = max_isa();
  return static_cast<Isa>(cap < 0 || cap > hw ? hw : cap);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::AVX2: return "avx2";
    case Isa::AVX512: return "avx512";
    case Isa::AVX512_VNNI: return "avx512_vnni";
  }
  return "?";
}

int isa_from_name(const std::string& name) {
  for (int i = 0; i <= 3; ++i)
    if (name == isa_name(static_cast<Isa>(i))) return i;
  return -1;
}

}  // namespace kdfast
