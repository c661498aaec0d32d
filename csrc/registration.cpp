// The one registration file of kdfast._C: the Python module (build facts,
// CPU path control) and the torch library that kernel files add to.
//
// Kernel files register their ops with TORCH_LIBRARY_FRAGMENT(kdfast_C, m);
// Python reaches them as torch.ops.kdfast_C.<name>. Compiled kernels are
// plain functions of tensors: schemas, autograd and backend choice live in
// kdfast/ops (see DESIGN.md).
#include <torch/extension.h>

#include "cpu/attention_train.h"
#include "cpu/isa.h"

#ifndef KDFAST_WITH_CUDA
#define KDFAST_WITH_CUDA 0
#endif

TORCH_LIBRARY(kdfast_C, m) {}

namespace {
py::dict build_info() {
  py::dict d;
  d["torch_version"] = KDFAST_TORCH_VERSION;
  d["with_cuda"] = static_cast<bool>(KDFAST_WITH_CUDA);
  d["openmp"] =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  py::list paths;
  paths.append("scalar");
#if KDFAST_HAVE_X86_PATHS
  paths.append("avx2");
  paths.append("avx512");
  paths.append("avx512_vnni");
#endif
  d["cpu_isa_paths"] = paths;
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast compiled kernels";
  m.def("build_info", &build_info, "Facts fixed when the extension was compiled");
  m.def("hardware_isa", [] { return std::string(kdfast::isa_name(kdfast::hardware_isa())); },
        "Best CPU path this machine supports");
  m.def("cpu_isa", [] { return std::string(kdfast::isa_name(kdfast::cpu_isa())); },
        "CPU path kernels use now (hardware capped by set_max_isa / KDFAST_CPU_ISA)");
  m.def("set_max_isa", [](const std::string& name) {
    int level = name.empty() ? -1 : kdfast::isa_from_name(name);
    TORCH_CHECK(name.empty() || level >= 0, "unknown CPU ISA '", name,
                "'; expected one of scalar, avx2, avx512, avx512_vnni");
    kdfast::set_max_isa(level);
  }, "Cap the CPU path ('' removes the cap)");
  m.def("attention_bf16_gemm_available", &kdfast::attention_bf16_gemm_available,
        "Whether bf16 attention inputs can run bf16 GEMMs (oneDNN brgemm on AMX) on this CPU");
  m.def("attention_bf16_gemm_enabled", &kdfast::attention_bf16_gemm_enabled,
        "Whether the bf16 GEMM path of the CPU training attention is allowed (KDFAST_ATTENTION_BF16_GEMM)");
  m.def("set_attention_bf16_gemm", &kdfast::set_attention_bf16_gemm,
        "Allow (True) or forbid (False: fp32 tiles) the bf16 GEMM path of the CPU training attention");
  m.def("attention_last_gemm", [] { return std::string(kdfast::attention_last_gemm()); },
        "GEMMs of the latest CPU training-attention call: 'bf16', 'fp32' ('' before any)");
  m.def("max_isa", [] {
    int l = kdfast::max_isa();
    return l < 0 ? std::string("") : std::string(kdfast::isa_name(static_cast<kdfast::Isa>(l)));
  });
}
