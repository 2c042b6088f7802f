#!/usr/bin/env python
"""Benchmark: the exp-gated linear recurrences (RWKV-4's WKV, xLSTM's mLSTM) at
T = 2048 — chunked prefill vs the step-by-step recurrence and vs token-by-token
decoding.

For each recurrence one layer with random weights, in MLX (float32):

* ``core chunked`` — :func:`hybridconv.models.linear_attention.exp_gated_chunked`
  on the layer's own gate/key/value tensors (loop over chunks only): what
  prefill runs;
* ``core steps`` — :func:`~hybridconv.models.linear_attention.exp_gated_step`
  over all T steps in one graph (the recurrence as transformers' WKV loop and
  mLSTM sequence kernel compute it);
* ``layer prefill`` vs ``layer decode`` — the whole layer (projections, token
  shift or gates, norm, output) over the T tokens at once, against the same
  layer driven one token at a time through its cache, each step evaluated (how
  a generation loop feeds it).

Layers: WKV — an RWKV-4-430M-shaped time mixing (hidden and attention width
1024: 1024 one-channel heads), chunks of ``models.rwkv.WKV_CHUNK``; mLSTM —
xLSTM-7B head shapes (q/k 256, v 512 per head) with 4 heads (hidden 2048),
chunks of 64. Each timing is the median of ``--repeat`` runs after a warm-up;
the chunked and step outputs are compared (max |Δ| relative to the largest
output). ``--wkv-chunks 16 32 64`` also times the WKV core at other chunk sizes.

Usage: python scripts/bench_linear_recurrences.py [--T 2048] [--repeat 3] [--wkv-chunks ...] [--json out.json]

Measured (T = 2048, median of 3, MLX 0.32.4 CPU with the system OpenBLAS, 2-core
VM at load average 10–13 from other jobs): WKV core chunks of 8 2.49 s vs steps
2.70 s (16: 2.86 s, 32: 4.81 s); RWKV-4 time-mix layer prefill 2.64 s vs token
by token 21.8 s; mLSTM core 0.75 s vs 20.7 s; mLSTM layer 5.72 s vs 139 s (README,
"Exp-gated recurrences").
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

import hybridconv  # noqa: E402,F401  (loads the system OpenBLAS before MLX; hybridconv.blas)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from hybridconv import blas  # noqa: E402
from hybridconv.models import rwkv, xlstm  # noqa: E402
from hybridconv.models.common import StateCache  # noqa: E402
from hybridconv.models.linear_attention import NO_STATE, exp_gated_chunked, exp_gated_step  # noqa: E402


def timed(fn, repeat: int):
    out = fn()  # warm-up
    mx.eval(out)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_diff(a, b) -> float:
    return float(mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30))


def token_by_token(layer_fn, make_cache, x):
    cache = make_cache()
    outs = []
    for t in range(x.shape[1]):
        y = layer_fn(x[:, t : t + 1], cache)
        mx.eval(y)
        outs.append(y)
    return mx.concatenate(outs, axis=1)


def wkv_case(T: int, repeat: int, chunks: list[int]) -> list[dict]:
    args = rwkv.ModelArgs(hidden_size=1024, attention_hidden_size=1024, intermediate_size=4096, rescale_every=0)
    layer = rwkv.TimeMix(args, 1.0)
    A = args.attention_hidden_size
    layer.time_decay = mx.random.uniform(-6.0, 3.0, (A,))  # decays e^-(e^-6) .. e^-(e^3) per step
    layer.time_first = mx.random.normal((A,))
    for name in ("time_mix_key", "time_mix_value", "time_mix_receptance"):
        setattr(layer, name, mx.random.uniform(0.0, 1.0, (1, 1, args.hidden_size)))
    mx.eval(layer.parameters())
    x = mx.random.normal((1, T, args.hidden_size))
    shifted = mx.concatenate([mx.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    k = layer.key(rwkv.mix(x, shifted, layer.time_mix_key))
    v = layer.value(rwkv.mix(x, shifted, layer.time_mix_value))
    log_f = mx.broadcast_to(-mx.exp(layer.time_decay), k.shape)
    mx.eval(k, v, log_f)
    rows = []
    kw = {"bonus": layer.time_first, "m0": NO_STATE}

    def ratio(out):
        return out[0][..., 0] / out[1]

    ts, step = timed(lambda: ratio(exp_gated_step(None, None, v[..., None], log_f, k, None, **kw)), repeat)
    for c in sorted(set(chunks) | {rwkv.WKV_CHUNK}):
        tc, out = timed(lambda: ratio(exp_gated_chunked(None, None, v[..., None], log_f, k, None, c, **kw)), repeat)
        rows.append({"case": f"WKV core, chunks of {c}", "T": T, "chunked_s": tc, "steps_s": ts,
                     "speedup": ts / tc, "max_rel_diff": rel_diff(out, step)})
    tp, yp = timed(lambda: layer(x), repeat)
    td = time.perf_counter()
    yd = token_by_token(lambda xt, c: layer(xt, c[0], c[1]), lambda: (StateCache(), StateCache()), x)
    td = time.perf_counter() - td
    rows.append({"case": "RWKV-4 time-mix layer: prefill vs token by token", "T": T, "chunked_s": tp,
                 "steps_s": td, "speedup": td / tp, "max_rel_diff": rel_diff(yp, yd)})
    return rows


def mlstm_case(T: int, repeat: int) -> list[dict]:
    args = xlstm.ModelArgs(hidden_size=2048, num_heads=4, chunk_size=64)
    layer = xlstm.MLSTMLayer(args)
    layer.igate_preact.bias = mx.full((4,), -2.0)
    layer.fgate_preact.bias = mx.linspace(3.0, 6.0, 4)
    mx.eval(layer.parameters())
    x = mx.random.normal((1, T, args.hidden_size)) * 0.5
    B = 1
    heads = lambda t: t.reshape(B, T, 4, -1)  # noqa: E731
    q, k, v = heads(layer.q(x)), heads(layer.k(x)), heads(layer.v(x))
    i_gate = xlstm.cap(layer.igate_preact(x), args.gate_soft_cap)
    log_f = nn.log_sigmoid(xlstm.cap(layer.fgate_preact(x), args.gate_soft_cap))
    mx.eval(q, k, v, i_gate, log_f)
    tc, oc = timed(lambda: exp_gated_chunked(q, k, v, log_f, i_gate, None, 64)[0], repeat)
    ts, os_ = timed(lambda: exp_gated_step(q, k, v, log_f, i_gate, None)[0], repeat)
    rows = [{"case": "mLSTM core (4 heads, q/k 256, v 512), chunks of 64", "T": T, "chunked_s": tc, "steps_s": ts,
             "speedup": ts / tc, "max_rel_diff": rel_diff(oc, os_)}]
    tp, yp = timed(lambda: layer(x), repeat)
    td = time.perf_counter()
    yd = token_by_token(lambda xt, c: layer(xt, c), StateCache, x)
    td = time.perf_counter() - td
    rows.append({"case": "xLSTM mLSTM layer: prefill vs token by token", "T": T, "chunked_s": tp, "steps_s": td,
                 "speedup": td / tp, "max_rel_diff": rel_diff(yp, yd)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wkv-chunks", type=int, nargs="*", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    mx.random.seed(0)
    print(f"(MLX {mx.__version__}, device {mx.default_device()}, BLAS {blas.status().get('kind')}, T = {args.T}, "
          f"median of {args.repeat})", flush=True)
    rows = wkv_case(args.T, args.repeat, args.wkv_chunks) + mlstm_case(args.T, args.repeat)
    print(f"| what (T = {args.T}) | chunked / prefill (s) | steps / token by token (s) | ratio | max rel. diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['chunked_s']:.3g} | {r['steps_s']:.3g} | {r['speedup']:.1f}x | {r['max_rel_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
