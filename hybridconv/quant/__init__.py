"""Hybrid-aware quantization: a per-architecture policy of what is never
quantized (SSM and RG-LRU parameters, conv kernels, norms: float32), roles for
the weight matrices (some marked sensitive), recipes and overrides, a streamed
writer in mlx-lm's format, and a search for the smallest plan meeting a KL target."""
