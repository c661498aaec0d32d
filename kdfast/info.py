"""`python -m kdfast.info`: what was built, what can run here, and which backend each op uses.

Touches the GPU only when run (never at import of kdfast).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import kdfast
from kdfast import _ext, backends


def collect() -> dict:
    info = {
        "kdfast": kdfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": "loaded" if _ext.extension() is not None else f"unavailable: {_ext.extension_error()}",
        "build": _ext.build_info(),
        "triton": None,
        "cpu_isa": None,
        "gpu": None,
    }
    r = backends.triton_available()
    if r is None:
        import triton
        info["triton"] = triton.__version__ + (" (TRITON_INTERPRET=1)" if backends.triton_interpret() else "")
    else:
        info["triton"] = f"unavailable: {r}"
    if _ext.extension() is not None:
        from kdfast import cpu_isa
        info["cpu_isa"] = {"hardware": cpu_isa.hardware_isa(), "in use": cpu_isa.current_isa(),
                           "compiled": info["build"].get("cpu_isa_paths")}
        info["cpu_buffer_cache"] = "off (KDFAST_CPU_BUFFER_CACHE=0)" if os.environ.get(
            "KDFAST_CPU_BUFFER_CACHE") == "0" else "on (one block >= 16 MiB kept for reuse; kdfast.buffer_cache)"
        info["cpu_attention_bf16_gemm"] = _attention_bf16_gemm(_ext.extension())
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    usable = {}
    for b in backends.BACKENDS:
        dev = "cuda" if b == "cuda" else "cpu"
        if b == "triton":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        r = backends._generic_reason(b, torch.device(dev), None)
        usable[b] = "usable" if r is None else r
    info["backends"] = usable
    info["ops"] = {op: {"cpu": backends.plan(op, "cpu").backend, "cuda": backends.plan(op, "cuda").backend}
                   for op in backends.registered_ops()}
    return info


def _attention_bf16_gemm(c) -> str:
    """Which GEMMs bf16 inputs of the CPU training attention run (csrc/cpu/attention_train.cpp)."""
    if not c.attention_bf16_gemm_available():
        return ("unavailable (oneDNN brgemm cannot pack bf16 here: no AMX-BF16, or torch.backends.mkldnn off); "
                "bf16 runs fp32 tiles")
    if not c.attention_bf16_gemm_enabled():
        return "off (KDFAST_ATTENTION_BF16_GEMM=0 or _C.set_attention_bf16_gemm(False)); bf16 runs fp32 tiles"
    return "bf16 GEMMs (oneDNN brgemm, AMX) for bf16 inputs on the avx512 paths; KDFAST_ATTENTION_BF16_GEMM=0 turns off"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kdfast.info", description=__doc__)
    ap.add_argument("--short", action="store_true", help="one line per fact, no op table")
    args = ap.parse_args(argv)
    info = collect()
    print(f"kdfast {info['kdfast']}  python {info['python']}  torch {info['torch']} (cuda {info['torch_cuda']})")
    print(f"extension kdfast._C: {info['extension']}")
    if info["build"]:
        b = info["build"]
        print(f"  built for torch {b.get('torch_version')}, cuda sources: {b.get('with_cuda')}"
              f" archs: {b.get('cuda_archs') or '-'}, openmp: {b.get('openmp')}")
    if info["cpu_isa"]:
        c = info["cpu_isa"]
        print(f"cpu ISA: hardware {c['hardware']}, in use {c['in use']}, compiled paths {', '.join(c['compiled'])}")
    if info.get("cpu_buffer_cache"):
        print(f"cpu buffer cache: {info['cpu_buffer_cache']}")
    if info.get("cpu_attention_bf16_gemm"):
        print(f"cpu attention bf16: {info['cpu_attention_bf16_gemm']}")
    print(f"triton: {info['triton']}")
    print(f"gpu: {', '.join(info['gpu']) if info['gpu'] else 'none'}")
    print("backends:")
    for b, s in info["backends"].items():
        print(f"  {b:10s} {s}")
    if args.short:
        return 0
    print("ops (backend chosen automatically for CPU / CUDA tensors):")
    width = max(len(o) for o in info["ops"]) if info["ops"] else 10
    for op, d in info["ops"].items():
        print(f"  {op:{width}s}  cpu: {d['cpu']:10s} cuda: {d['cuda']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
