"""Comparing logits and hidden states (numpy, float64 where it matters).

KL is ``KL(ref || mlx) = Σ p_ref · (log p_ref − log p_mlx)`` per token, in nats.
With a top-k reference file, the sum runs over the reference's top-k tokens and
one "rest of the vocabulary" bucket, whose mass both sides know exactly; this is
a lower bound of the full KL (merging outcomes never increases KL).
"""

from __future__ import annotations

import numpy as np

# Top-1 / top-5 agreement is gated only over *decisive* tokens. For top-1: the
# reference's best two logits differ by at least DECISIVE_GAP nats (p1 >= 1.65 p2);
# for top-5: its 5th and 6th best do (the set of five is then well defined).
# Where the reference is nearly indifferent between tokens (random tiny models are
# nearly uniform: a top-2 gap of 0.1 nats), their ranks are rounding noise of any
# low-precision build; KL measures those tokens instead. An agreement estimated
# from fewer than MIN_DECISIVE tokens is noise too: the gate is then skipped.
DECISIVE_GAP = 0.5
MIN_DECISIVE = 16

# Position buckets for KL along the sequence: recurrent errors grow with position.
BUCKETS = [(0, 16), (16, 64), (64, 256), (256, 1024), (1024, 4096), (4096, None)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


ROWS = 64  # tokens per block of work: [ROWS, V] float64 arrays stay small for big vocabularies


def token_stats(ref: dict, got: np.ndarray, ids: np.ndarray) -> dict:
    """Per-token arrays for one sequence. ``ref`` is a dict with either ``logits``
    [T, V] or ``topk_indices``/``topk_logits`` [T, k] + ``logsumexp`` [T] +
    ``token_logprobs`` [T]. Works through the tokens in blocks of :data:`ROWS`."""
    T = got.shape[0]
    parts = [_token_stats_rows(ref, got, ids, lo, min(T, lo + ROWS)) for lo in range(0, T, ROWS)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("kl", "top1", "top5", "decisive", "decisive5", "max_abs", "sum_abs", "n_abs")}
    out["ref_nll"] = np.concatenate([p["ref_nll"] for p in parts])[: T - 1]
    out["mlx_nll"] = np.concatenate([p["mlx_nll"] for p in parts])[: T - 1]
    return out


def _top(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of each row's ``n`` largest entries, largest first: ``argsort(-x)[:, :n]``
    without sorting the whole vocabulary (a 256k vocabulary: 30x faster)."""
    if x.shape[-1] <= n:
        return np.argsort(-x, axis=-1)
    part = np.argpartition(-x, n - 1, axis=-1)[:, :n]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1), axis=-1)


def _token_stats_rows(ref: dict, got_all: np.ndarray, ids: np.ndarray, lo: int, hi: int) -> dict:
    got = np.asarray(got_all[lo:hi], dtype=np.float64)
    lq = log_softmax(got)  # [R, V]
    R = hi - lo
    nxt = np.append(ids[lo + 1 : hi + 1], 0)[:R]  # next tokens (last row of the sequence: unused)
    out: dict = {}
    if "logits" in ref:
        rl = np.asarray(ref["logits"][lo:hi], dtype=np.float64)
        lp = log_softmax(rl)
        out["kl"] = (np.exp(lp) * (lp - lq)).sum(-1)
        diff = np.abs(rl - got)
        order = _top(rl, 6)
        ref_top = order[:, :5]
        ref_nll = -lp[np.arange(R), nxt]
        best = np.take_along_axis(rl, order[:, :6], axis=-1)
        gap = best[:, 0] - best[:, 1]
        gap5 = best[:, 4] - best[:, 5] if best.shape[1] > 5 else np.full(R, np.inf)
    else:
        idx = np.asarray(ref["topk_indices"][lo:hi])
        tl = np.asarray(ref["topk_logits"][lo:hi], dtype=np.float64)
        lp_k = tl - np.asarray(ref["logsumexp"][lo:hi], dtype=np.float64)[:, None]
        lq_k = np.take_along_axis(lq, idx, axis=-1)
        p_k, q_k = np.exp(lp_k), np.exp(lq_k)
        p_rest = np.clip(1 - p_k.sum(-1), 1e-30, 1)
        q_rest = np.clip(1 - q_k.sum(-1), 1e-30, 1)
        out["kl"] = (p_k * (lp_k - lq_k)).sum(-1) + p_rest * (np.log(p_rest) - np.log(q_rest))
        diff = np.abs(tl - np.take_along_axis(got, idx, axis=-1))
        ref_top = idx[:, :5]
        ref_nll = -np.asarray(ref["token_logprobs"][lo:hi], dtype=np.float64)
        # a top-1 file cannot tell the gap: every token counts as decisive
        gap = tl[:, 0] - tl[:, 1] if tl.shape[1] > 1 else np.full(R, np.inf)
        gap5 = tl[:, 4] - tl[:, 5] if tl.shape[1] > 5 else np.full(R, np.inf)
    got_top = _top(got, 5)
    out["top1"] = ref_top[:, 0] == got_top[:, 0]
    k = min(5, ref_top.shape[1])
    out["top5"] = np.array([len(set(ref_top[t, :k]) & set(got_top[t, :k])) / k for t in range(R)])
    out["decisive"] = gap >= DECISIVE_GAP
    out["decisive5"] = gap5 >= DECISIVE_GAP
    out["max_abs"] = diff.max(-1)
    out["sum_abs"] = diff.sum(-1)
    out["n_abs"] = np.full(R, diff.shape[-1])
    out["ref_nll"] = ref_nll
    out["mlx_nll"] = -lq[np.arange(R), nxt]
    return out


def summarise(stats: list[dict]) -> dict:
    """Metrics over the tokens of ``stats`` (one dict per sequence)."""
    kl = np.concatenate([s["kl"] for s in stats])
    diff_max = max(float(s["max_abs"].max()) for s in stats)
    diff_mean = float(sum(s["sum_abs"].sum() for s in stats) / sum(s["n_abs"].sum() for s in stats))
    ref_nll = np.concatenate([s["ref_nll"] for s in stats])
    mlx_nll = np.concatenate([s["mlx_nll"] for s in stats])
    ppl_ref = float(np.exp(ref_nll.mean())) if ref_nll.size else float("nan")
    ppl_mlx = float(np.exp(mlx_nll.mean())) if mlx_nll.size else float("nan")
    decisive = np.concatenate([s["decisive"] for s in stats])
    decisive5 = np.concatenate([s["decisive5"] for s in stats])
    top1 = np.concatenate([s["top1"] for s in stats])
    top5 = np.concatenate([s["top5"] for s in stats])
    buckets = []
    for lo, hi in BUCKETS:
        vals = [s["kl"][lo:hi] for s in stats if len(s["kl"]) > lo]
        if vals:
            v = np.concatenate(vals)
            label = f"{lo}-{hi - 1}" if hi else f"{lo}+"
            buckets.append({"positions": label, "tokens": int(v.size), "kl_mean": float(v.mean())})
    return {
        "tokens": int(kl.size),
        "max_abs_logit_diff": diff_max,
        "mean_abs_logit_diff": diff_mean,
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(top1)),
        "top5_overlap": float(np.mean(top5)),
        "decisive_tokens": int(decisive.sum()),
        "decisive_tokens_top5": int(decisive5.sum()),
        "top1_agreement_decisive": float(np.mean(top1[decisive])) if decisive.any() else None,
        "top5_overlap_decisive": float(np.mean(top5[decisive5])) if decisive5.any() else None,
        "perplexity_ref": ppl_ref,
        "perplexity_mlx": ppl_mlx,
        "perplexity_ratio": ppl_mlx / ppl_ref if ppl_ref else float("nan"),
        "kl_by_position": buckets,
    }


def relative_error(sq_diff: float, sq_ref: float) -> float:
    return float(np.sqrt(sq_diff / sq_ref)) if sq_ref > 0 else float(np.sqrt(sq_diff))
