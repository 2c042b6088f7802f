"""How fast this machine runs the products that verify needs (``hybridconv doctor``).

Measures GFLOP/s of one ``[M, K] @ [K, N]`` product (a block of tokens through
a projection) in MLX — float32 (the BLAS), bfloat16 and 4-bit affine with MLX's
own kernels, and 4-bit the way verify's float32 compute path runs it
(dequantized to float32, then the BLAS) — and in torch float32 when torch is
installed, and says whether MLX is on the slow path and what fixes it.
"""

from __future__ import annotations

import os
import platform
import time

from .. import blas

SHAPE = (128, 1024, 1024)  # M tokens, K in, N out: 0.27 GFLOP per product
BUDGET_S = 0.3  # timed seconds per measurement, after one warm-up product
# MLX float32 below this fraction of torch's float32 (or of FAST_GFLOPS without
# torch) means MLX is not calling an optimised BLAS.
SLOW_FRACTION = 0.25
FAST_GFLOPS = 10.0


def _time(fn, flops: float, budget: float, trust_first: bool = True) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, kernel choice, thread start; GPU kernels compile here)
    first = time.perf_counter() - t0
    if trust_first and first >= budget:  # a slow CPU product: its first run is the measurement
        return flops / first / 1e9
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= budget or reps >= 1000:
            return flops * reps / dt / 1e9


def measure_mlx(shape=SHAPE, budget: float = BUDGET_S) -> dict:
    """GFLOP/s of MLX's products on its default device."""
    import mlx.core as mx

    M, K, N = shape
    flops = 2.0 * M * K * N
    key = mx.random.key(0)
    x32 = mx.random.normal((M, K), key=key)
    w32 = mx.random.normal((N, K), key=mx.random.key(1)) * 0.05
    x16, w16 = x32.astype(mx.bfloat16), w32.astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w16, group_size=64, bits=4)
    mx.eval(x32, w32, x16, w16, wq, scales, biases)
    runs = {
        "float32": lambda: mx.eval(x32 @ w32.T),
        "bfloat16": lambda: mx.eval(x16 @ w16.T),
        "4bit": lambda: mx.eval(mx.quantized_matmul(x16, wq, scales, biases, transpose=True, group_size=64, bits=4)),
        "4bit_as_float32": lambda: mx.eval(
            x32 @ mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=4).T),
    }
    cpu = mx.default_device() == mx.cpu
    return {name: round(_time(fn, flops, budget, trust_first=cpu), 2) for name, fn in runs.items()}


def measure_torch(shape=SHAPE, budget: float = BUDGET_S) -> dict | None:
    """GFLOP/s of torch's float32 product on the CPU, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    with torch.inference_mode():
        gf = _time(lambda: x @ w.T, 2.0 * M * K * N, budget)
    return {"float32": round(gf, 2), "threads": torch.get_num_threads(), "version": torch.__version__}


def doctor(shape=SHAPE, budget: float = BUDGET_S, with_torch: bool = True) -> dict:
    """The doctor's report: machine, the BLAS behind MLX, measured GFLOP/s, the
    compute path verify takes for low-precision folders here, and findings (each
    with its fix)."""
    import importlib.metadata as md

    import mlx.core as mx

    status = blas.status()
    mlx_speed = measure_mlx(shape, budget)
    torch_speed = measure_torch(shape, budget) if with_torch else None
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "mlx": {"version": md.version("mlx"), "device": device},
        "blas": status,
        "shape": {"M": shape[0], "K": shape[1], "N": shape[2]},
        "gflops": {"mlx": mlx_speed, "torch": torch_speed},
        "verify_compute": {
            "low_precision_folders": "float32" if device == "cpu" else "native",
            "why": ("MLX's CPU backend has no fast bf16/fp16/quantized kernels: verify uses the stored weights "
                    "in float32 through the BLAS (see `hybridconv verify --compute`)") if device == "cpu"
            else "MLX's own low-precision kernels are fast on this device",
        },
    }
    findings = []
    ref_speed = torch_speed["float32"] if torch_speed else FAST_GFLOPS / SLOW_FRACTION
    if device == "cpu" and (status.get("kind") == "reference" or mlx_speed["float32"] < SLOW_FRACTION * ref_speed):
        findings.append({
            "problem": (f"MLX float32 products run at {mlx_speed['float32']:.1f} GFLOP/s"
                        + (f", torch at {torch_speed['float32']:.1f}" if torch_speed else "")
                        + f": MLX calls {'the reference (netlib) BLAS' if status.get('kind') == 'reference' else 'a slow BLAS'}"),
            "fix": status.get("fix", blas.INSTALL_HINT),
        })
    report["findings"] = findings
    report["slow_path"] = bool(findings)
    return report
