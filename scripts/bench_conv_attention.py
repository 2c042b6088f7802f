#!/usr/bin/env python
"""Benchmark: prefill at T = 2048 vs token-by-token cached decode for the
convolution / attention hybrids of issue 23 (LFM3, ZAYA1, Inkling, Inkling-2,
Inkling-2-Mini).

Their sequence mixers are no linear recurrence but short (static, dynamic or
CCA) convolutions whose decoding state is the last ``K − 1`` inputs, and
attention — for the Inkling family with a per-token relative position bias
and sinks that ``mx.fast`` cannot take (``models.common.attend_biased``:
explicit scores in query blocks of 128). Prefill runs each convolution over the
whole sequence (a loop over taps, not time) and the attention in query blocks;
decode runs the same math one token at a time through the caches. This script
times both on one model per type with random weights (float32, MLX; sizes
below: two to four layers of width 512, 8 heads of 64, windows of 512,
small MoEs), and checks that they agree (max |Δ| of the logits).

Usage: python scripts/bench_conv_attention.py [--T 2048] [--repeat 3] [--only lfm3 ...] [--json out.json]
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

import hybridconv  # noqa: E402,F401  (loads the system OpenBLAS before MLX on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from hybridconv import blas  # noqa: E402
from hybridconv.converters import lookup  # noqa: E402

D, H, KV, HD, V = 512, 8, 2, 64, 2048
MOE = dict(moe_intermediate_size=256, num_experts_per_tok=2)
CONFIGS = {
    "lfm3": dict(model_type="lfm3", hidden_size=D, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=H,
                 num_key_value_heads=KV, head_dim=HD, vocab_size=V, sliding_window=512,
                 layer_types=["conv", "full_attention", "sliding_attention"]),
    "zaya": dict(model_type="zaya", hidden_size=D, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=KV,
                 head_dim=HD, vocab_size=V, num_experts=8, num_experts_per_tok=1, moe_intermediate_size=256,
                 router_hidden_size=128, sliding_window=512, layer_types=["hybrid", "hybrid_sliding"]),
    "inkling_text": dict(model_type="inkling_text", hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                         num_key_value_heads=KV, head_dim=HD, swa_num_attention_heads=H, swa_num_key_value_heads=KV,
                         swa_head_dim=HD, sliding_window_size=512, rel_extent=1024, vocab_size=V,
                         n_routed_experts=8, n_shared_experts=1, log_scaling_n_floor=512,
                         layer_types=["hybrid", "hybrid_sliding"], mlp_layer_types=["sparse", "sparse"], **MOE),
    "inkling2_text": dict(model_type="inkling2_text", hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                          num_key_value_heads=KV, head_dim=HD, swa_num_attention_heads=H, swa_num_key_value_heads=KV,
                          swa_head_dim=HD, sliding_window_size=512, rel_extent=1024, vocab_size=V,
                          unpadded_vocab_size=V, n_routed_experts=8, log_scaling_n_floor=512,
                          n_layers_per_attn_res_block=1, layer_types=["hybrid", "hybrid_sliding"], **MOE),
    "inkling2_loop_text": dict(model_type="inkling2_loop_text", hidden_size=D, num_hidden_layers=4,
                               num_attention_heads=H, num_key_value_heads=KV, head_dim=HD, swa_num_attention_heads=H,
                               swa_num_key_value_heads=KV, swa_head_dim=HD, sliding_window_size=512, rel_extent=1024,
                               vocab_size=V, unpadded_vocab_size=V, n_routed_experts=8, log_scaling_n_floor=512,
                               n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4,
                               loop_num_passes=2, loop_gate_rank=32,
                               layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"], **MOE),
}


def build(name: str):
    raw = CONFIGS[name]
    arch = lookup(raw)
    model = arch.build_model(arch.normalize_config(raw))
    mx.random.seed(0)
    from mlx.utils import tree_flatten, tree_unflatten

    # small random weights everywhere (zero-initialised queries/scales would hide work)
    params = [(k, mx.random.normal(v.shape) * 0.02 + (1.0 if k.endswith(("norm.weight", "scale")) else 0.0))
              for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def timed(fn, repeat: int):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    print(f"MLX {mx.__version__}, BLAS: {blas.status() if hasattr(blas, 'status') else 'see hybridconv doctor'}")
    ids = mx.array(np.random.default_rng(0).integers(0, V, size=(1, a.T)).astype(np.int32))
    rows = []
    for name in a.only or CONFIGS:
        model = build(name)

        def prefill():
            out = model(ids)
            mx.eval(out)
            return out

        def decode():
            cache = model.make_cache()
            outs = []
            for t in range(a.T):
                o = model(ids[:, t : t + 1], cache=cache)
                mx.eval(o)
                outs.append(o)
            return mx.concatenate(outs, axis=1)

        tp, full = timed(prefill, a.repeat)
        td, stepped = timed(decode, 1)
        diff = float(mx.abs(full - stepped).max())
        rows.append(dict(model=name, blocks=len(model.layers), T=a.T, prefill_s=tp, decode_s=td,
                         speedup=td / tp, max_abs_diff=diff))
        print(f"{name:20s} blocks {len(model.layers)}  prefill {tp:7.2f} s   decode {td:7.2f} s   "
              f"({td / tp:5.1f}x)   max|Δ| {diff:.1e}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
