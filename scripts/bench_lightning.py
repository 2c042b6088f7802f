#!/usr/bin/env python
"""Benchmark: chunked lightning-attention prefill vs the step-by-step recurrence, T = 2048.

Lightning attention (MiniMax-Text-01) is the gated linear recurrence without
the delta rule, ``S_t = exp(-slope_h) S_{t-1} + k_t v_tᵀ``, evaluated by the
shared chunked core (:func:`hybridconv.models.gated_delta.gated_linear_attention_chunked`,
chunks of 64, loop over chunks only). One MiniMax lightning layer (hidden
2048, 16 heads of 128 — a quarter of the released 6144 / 64 heads, same head
size) with random weights turns a random hidden sequence into q, k, v; then,
in MLX (float32):

* ``chunked`` — ``gated_linear_attention_chunked`` over all T steps: what prefill runs;
* ``steps``   — ``gated_linear_attention_step`` over all T steps in one graph (the
  recurrence as transformers' one-token decode path computes it);
* ``decode``  — the whole layer driven one token at a time through its cache,
  each step evaluated, timed against the layer's own chunked prefill.

Each timing is the median of ``--repeat`` runs after a warm-up; the outputs of
the two forms are compared (max |Δ|). Prints a table; ``--json`` writes it.

Usage: python scripts/bench_lightning.py [--T 2048] [--repeat 3] [--json out.json]

Measured (T = 2048, median of 3; MLX 0.32.4 CPU with the system OpenBLAS,
2-core VM shared with other jobs, load average ~6): the core chunked 0.273 s
vs steps 3.03 s (11x), outputs 1.9e-6 apart relative; the whole lightning
layer, chunked prefill 3.92 s vs token by token through its cache 105 s (27x).
Without the delta rule the chunked form needs no UT transform (all matmuls),
so it wins on the CPU too, unlike the delta-rule cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# hybridconv first: on Linux it loads the system OpenBLAS before MLX (hybridconv.blas).
import hybridconv  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from hybridconv import blas  # noqa: E402
from hybridconv.models import minimax  # noqa: E402
from hybridconv.models.common import StateCache  # noqa: E402
from hybridconv.models.gated_delta import gated_linear_attention_chunked, gated_linear_attention_step  # noqa: E402


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    mx.eval(out)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-decode", action="store_true", help="skip the token-by-token layer run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    mx.random.seed(0)
    T, H, D = args.T, 16, 128
    cfg = minimax.ModelArgs(hidden_size=2048, num_attention_heads=H, head_dim=D, num_hidden_layers=8)
    layer = minimax.LightningAttention(cfg)
    base = 2 ** (-8 / H)
    layer.slope_rate = (base ** mx.arange(1, H + 1, dtype=mx.float32) * 0.5).reshape(H, 1, 1)  # layer 4 of 8
    for lin in (layer.qkv_proj, layer.output_gate, layer.out_proj):
        lin.weight = lin.weight * 0.5
    mx.eval(layer.parameters())
    x = mx.random.normal((1, T, cfg.hidden_size)) * 0.5
    q, k, v = mx.split(nn.silu(layer.qkv_proj(x)).reshape(1, T, H, 3 * D), 3, axis=-1)
    g = mx.broadcast_to(-layer.slope_rate.reshape(H), (1, T, H))
    mx.eval(q, k, v, g)
    rows = []
    tc, (oc, sc) = timed(lambda: gated_linear_attention_chunked(q, k, v, g, None, 64, scale=1.0), args.repeat)
    ts, (os_, ss) = timed(lambda: gated_linear_attention_step(q, k, v, g, None, scale=1.0), args.repeat)
    diff = max(float(mx.abs(oc - os_).max() / mx.abs(os_).max()), float(mx.abs(sc - ss).max() / mx.abs(ss).max()))
    rows.append({"case": f"lightning core (per-head fixed decay, {H} heads x {D})", "T": T, "chunked_s": tc,
                 "steps_s": ts, "speedup": ts / tc, "max_rel_diff": diff})

    if not args.skip_decode:
        tl, full = timed(lambda: layer(x), args.repeat)

        def decode():
            cache, outs = StateCache(), []
            for t in range(T):
                o = layer(x[:, t : t + 1], cache=cache)
                mx.eval(o, cache[1])
                outs.append(o)
            return mx.concatenate(outs, axis=1)

        t0 = time.perf_counter()
        dec = decode()
        td = time.perf_counter() - t0
        rows.append({"case": "MiniMax lightning layer: chunked prefill vs token-by-token through the cache",
                     "T": T, "chunked_s": tl, "steps_s": td, "speedup": td / tl,
                     "max_rel_diff": float(mx.abs(full - dec).max() / mx.abs(full).max())})

    print(f"{'case':<80} {'chunked s':>10} {'steps s':>9} {'ratio':>7} {'max rel diff':>12}")
    for r in rows:
        print(f"{r['case']:<80} {r['chunked_s']:>10.3f} {r['steps_s']:>9.3f} {r['speedup']:>6.1f}x "
              f"{r['max_rel_diff']:>12.2e}")
    print(f"(MLX {mx.__version__}, device {mx.default_device()}, BLAS {blas.status().get('kind')}, T = {T}, "
          f"median of {args.repeat})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
