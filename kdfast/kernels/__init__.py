"""Kernels: Triton launchers (kdfast.kernels.triton); compiled C++/CUDA kernels live in kdfast._C."""
