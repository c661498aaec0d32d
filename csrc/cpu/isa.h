// Runtime selection of CPU instruction-set paths.
//
// Every hot loop is compiled several times with GCC target attributes
// (KDFAST_TARGET_AVX2 / KDFAST_TARGET_AVX512 / KDFAST_TARGET_AVX512_VNNI) and
// the variant is chosen at run time from what the CPU supports, capped by
// KDFAST_CPU_ISA or kdfast._C.set_max_isa() so tests can force each path.
#pragma once
#include <string>

namespace kdfast {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, AVX512_VNNI = 3 };

// Best path the CPU supports, capped by the forced maximum.
Isa cpu_isa();
// What the hardware supports, ignoring any cap.
Isa hardware_isa();
// Cap the path used (-1 = no cap / follow KDFAST_CPU_ISA).
void set_max_isa(int level);
int max_isa();
const char* isa_name(Isa isa);
int isa_from_name(const std::string& name);  // -1 if unknown

}  // namespace kdfast

#if KDFAST_ISA_X86 && defined(__GNUC__)
#define KDFAST_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define KDFAST_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")))
#define KDFAST_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,bmi2")))
#define KDFAST_HAVE_X86_PATHS 1
#else
#define KDFAST_HAVE_X86_PATHS 0
#endif
