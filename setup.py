"""Build kdfast and its compiled extension kdfast._C.

CPU C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built: -O3, OpenMP,
and AVX-512 / AVX2 / scalar variants of every hot loop chosen at run time
(never -march=native unless KDFAST_NATIVE=1).

CUDA sources (csrc/cuda/*.cu and their torch glue csrc/cuda/*_torch.cpp) are
built when torch has CUDA and nvcc is found. Environment flags:

  KDFAST_CUDA=auto|1|0        build CUDA sources (1 fails loudly if impossible)
  KDFAST_NO_EXTENSION=1       pure-Python install (reference/triton backends)
  KDFAST_NATIVE=1             add -march=native (not portable!)
  KDFAST_DEBUG=1              -O0 -g
  TORCH_CUDA_ARCH_LIST        CUDA archs (default "8.0;9.0")
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import json
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="auto"):
    return os.environ.get(name, default).strip().lower()


def _build_extension():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    debug = _flag("KDFAST_DEBUG", "0") in ("1", "true", "yes")
    native = _flag("KDFAST_NATIVE", "0") in ("1", "true", "yes")
    want_cuda = _flag("KDFAST_CUDA")
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

    nvcc = None
    if CUDA_HOME:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else shutil.which("nvcc")
    cuda_ok = torch.version.cuda is not None and nvcc is not None
    if want_cuda in ("1", "true", "yes") and not cuda_ok:
        raise RuntimeError(
            "KDFAST_CUDA=1 but CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={nvcc!r}. "
            "Install a CUDA build of torch and the CUDA toolkit, or unset KDFAST_CUDA."
        )
    with_cuda = cuda_ok and want_cuda not in ("0", "false", "no")

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""

    isa_paths = ["scalar"] + (["avx2", "avx512", "avx512_vnni"] if x86 else [])
    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_archs": archs,
        "cpu_isa_paths": isa_paths,
        "native": native,
        "debug": debug,
        "machine": platform.machine(),
    }
    # Read back by kdfast._ext to give a readable error on a torch mismatch.
    with open(os.path.join(ROOT, "kdfast", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)

    # -g0: Python's CFLAGS carry -g; debug info nearly doubles the compile time (kd_loss.cpp: 64 s -> 37 s on
    # the 2-core EPYC) and a release build has no use for it.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-DKDFAST_ISA_X86=%d" % int(x86)]
    if native:
        cxx.append("-march=native")
    defines = [("KDFAST_TORCH_VERSION", '"%s"' % torch.__version__)]
    srcs = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        define_macros=defines,
    )
    if with_cuda:
        srcs += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*_torch.cpp"))
        nvcc_flags = opt + ["-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "kdfast._C", srcs,
            extra_compile_args={"cxx": cxx + ["-DKDFAST_WITH_CUDA=1"], "nvcc": nvcc_flags + ["-DKDFAST_WITH_CUDA=1"]},
            **kwargs,
        )
    else:
        ext = CppExtension("kdfast._C", srcs, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if _flag("KDFAST_NO_EXTENSION", "0") in ("1", "true", "yes"):
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = _build_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass, package_data={"kdfast": ["_build_info.json"]})
