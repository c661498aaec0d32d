"""Triton kernels and their launchers (import nothing above kdfast.kernels)."""
