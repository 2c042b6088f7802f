"""One MLX pass per sequence for verify: the metrics' forward and the decode check
share it.

A sequence of ``T`` tokens with a decode check of ``k`` steps runs as a prefill
of its first ``T - k`` tokens through the model's caches, then ``k`` single-token
steps through the same caches. The prefill rows and the stepped rows together
are the sequence's logits (and block outputs) for the metrics; the stepped rows
alone are the decode check. Before, the decode check prefilled the same
``T - k`` tokens a second time: about 2x the MLX work per sequence for the
default 8 steps. The last ``k`` rows of the metrics are thus computed by cached
decode rather than by the prefill; both are the model's function (prefill =
cached decode is tested per architecture in float32), and the decode check's own
gate still bounds those rows.
"""

from __future__ import annotations

import numpy as np

from .. import interrupt
from .metrics import token_stats


def run_sequence(model, ids: np.ndarray, k: int, want_hidden: bool):
    """``(logits [T, V] float32 numpy, hidden or None, k)`` for one sequence.

    ``hidden`` is one MLX array ``[1, T, H]`` per block (the model's
    ``hidden_states`` outputs, prefill and steps joined); with ``k == 0`` the
    sequence runs as one plain forward (no caches)."""
    import mlx.core as mx

    T = len(ids)
    k = max(0, min(k, T - 1))
    if k == 0:
        hidden: list | None = [] if want_hidden else None
        logits = model(mx.array(ids[None]), hidden_states=hidden)
        return np.array(logits[0].astype(mx.float32)), hidden, 0
    cache = model.make_cache()
    hidden = [] if want_hidden else None
    logits = model(mx.array(ids[None, : T - k]), cache=cache, hidden_states=hidden)
    rows = [np.array(logits[0].astype(mx.float32))]
    del logits
    steps: list[list] = []
    for t in range(T - k, T):
        interrupt.check()
        h: list | None = [] if want_hidden else None
        step = model(mx.array(ids[None, t : t + 1]), cache=cache, hidden_states=h)
        rows.append(np.array(step[0].astype(mx.float32)))
        if want_hidden:
            steps.append(h)
    if want_hidden:
        hidden = [mx.concatenate([hidden[b]] + [s[b] for s in steps], axis=1) for b in range(len(hidden))]
    return np.concatenate(rows), hidden, k


def decode_check(got: np.ndarray, ids: np.ndarray, k: int, ref_out: dict) -> dict:
    """The decode check of one sequence: its last ``k`` rows (the stepped ones)
    against the reference's full-sequence logits."""
    T = len(ids)
    ref_rows = {key: v[T - k :] for key, v in ref_out.items()}
    st = token_stats(ref_rows, got[T - k :], ids[T - k :])
    return {
        "kl_max": float(st["kl"].max()),
        "max_abs_logit_diff": float(st["max_abs"].max()),
        "top1_agreement": float(st["top1"].mean()),
    }
