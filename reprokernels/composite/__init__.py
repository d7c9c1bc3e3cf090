"""Composite backends: existing best kernels (ATen's flash attention, batched GEMMs) glued together by
exact identities (the log-sum-exp merge). No @triton.jit, no C++: they run wherever ATen does."""
