"""@triton.jit kernels and their launchers (imported lazily: importing reprokernels never imports triton)."""
