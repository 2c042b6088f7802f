"""One MLX pass per sequence for verify: the metrics' forward and the decode check
share it.

A sequence of ``T`` tokens with a decode check of ``k`` steps runs as a prefill
of its first ``T - k`` tokens through the model's caches, then ``k`` single-token
steps through the same caches. The prefill rows and the stepped rows together
are the sequence's logits (and block outputs) for the metrics; the stepped rows
alone are the decode check. Sequences of one length run together as a batch
(:func:`run_sequences`). Before, the decode check prefilled the same
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


# Sequences of one length run together (a batch) while their logits and block
# outputs stay under this many bytes: each weight is then read (and, on the
# float32 compute path, upcast) once per step for the whole batch.
BATCH_BYTES = 1 << 30
MAX_BATCH = 8


def run_sequences(model, sequences, k: int, want_hidden: bool, vocab: int, hidden_size: int = 0,
                  n_blocks: int = 0, batch: bool = True):
    """``run_sequence`` for every sequence, in order (a generator): consecutive
    sequences of the same length run as one batch when ``batch`` (the model takes
    ``[B, T]`` with caches) and the batch's outputs fit :data:`BATCH_BYTES`."""
    i = 0
    while i < len(sequences):
        T = len(sequences[i])
        per_seq = T * 4 * (max(vocab, 1) + hidden_size * n_blocks * (2 if want_hidden else 0))
        limit = max(1, min(MAX_BATCH, BATCH_BYTES // max(per_seq, 1))) if batch and vocab > 0 else 1
        j = i + 1
        while j < len(sequences) and j - i < limit and len(sequences[j]) == T:
            j += 1
        if j - i == 1:
            yield run_sequence(model, sequences[i], k, want_hidden)
        else:
            got, hidden, kk = run_sequence(model, np.stack(sequences[i:j]), k, want_hidden)
            for b in range(j - i):
                yield got[b], (None if hidden is None else [h[b : b + 1] for h in hidden]), kk
            del got, hidden
        i = j


def run_sequence(model, ids: np.ndarray, k: int, want_hidden: bool):
    """``(logits [T, V] float32 numpy, hidden or None, k)`` for one sequence
    ``ids [T]`` (or ``[B, T, V]`` logits for a batch ``ids [B, T]``).

    ``hidden`` is one MLX array ``[B, T, H]`` per block (the model's
    ``hidden_states`` outputs, prefill and steps joined); with ``k == 0`` the
    sequence runs as one plain forward (no caches)."""
    import mlx.core as mx

    single = ids.ndim == 1
    ids = ids[None] if single else ids
    T = ids.shape[1]
    k = max(0, min(k, T - 1))
    if k == 0:
        hidden: list | None = [] if want_hidden else None
        logits = model(mx.array(ids), hidden_states=hidden)
        got = np.array(logits.astype(mx.float32))
        return (got[0] if single else got), hidden, 0
    cache = model.make_cache()
    hidden = [] if want_hidden else None
    logits = model(mx.array(ids[:, : T - k]), cache=cache, hidden_states=hidden)
    rows = [np.array(logits.astype(mx.float32))]
    del logits
    steps: list[list] = []
    for t in range(T - k, T):
        interrupt.check()
        h: list | None = [] if want_hidden else None
        step = model(mx.array(ids[:, t : t + 1]), cache=cache, hidden_states=h)
        rows.append(np.array(step.astype(mx.float32)))
        if want_hidden:
            steps.append(h)
    if want_hidden:
        hidden = [mx.concatenate([hidden[b]] + [s[b] for s in steps], axis=1) for b in range(len(hidden))]
    got = np.concatenate(rows, axis=1)
    return (got[0] if single else got), hidden, k


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


def own_block_errors(model, sequences, k: int, ref_hidden, dtypes: list) -> np.ndarray:
    """Each block's *own* error: the block run on the reference's input to it (the
    previous block's reference output; the model's own embedding for block 0),
    exactly as :func:`run_sequence` runs it (a cached prefill of ``T - k`` rows,
    then ``k`` single steps through the block's cache), compared with the
    reference's output of that block. Returns the squared differences summed over
    the sequences, per block (``relative_error`` against the same reference sums
    as the chained block table).

    Why: in the chained pass a block's error includes everything the blocks below
    it got wrong, so quantization noise that a small model amplifies block after
    block can exceed the block gate without any block being wrong; a block whose
    own error is small computes its function. ``ref_hidden(s, b)`` is the
    reference's output of block ``b`` for sequence ``s``; ``dtypes[b]`` the dtype
    the model's own output of block ``b`` had (the input dtype block ``b + 1``
    expects)."""
    import mlx.core as mx

    layers = model.layers
    sq = np.zeros(len(layers))
    for s, ids in enumerate(sequences):
        ids = np.asarray(ids)[None]
        T = ids.shape[1]
        kk = max(0, min(k, T - 1))
        x0 = model.embed(mx.array(ids))
        ref = None  # the previous block's reference output, read once: its target, then the next input
        own = None  # the previous block's own output (what a block passes beyond the reference's part)
        for b, layer in enumerate(layers):
            interrupt.check()  # a safe point: between blocks
            if ref is None:
                inp = x0
            else:
                inp = model.block_input(mx.array(ref.astype(np.float32)[None]).astype(dtypes[b - 1]), own)
            cache = model.layer_cache(layer) if kk else None
            if cache is None:  # no decode steps, or a stateless block: one call
                out = model.call_layer(layer, inp, None, x0)
                mx.eval(out)
            else:
                parts = [model.call_layer(layer, inp[:, : T - kk], cache, x0[:, : T - kk])]
                mx.eval(parts[-1])
                for t in range(T - kk, T):
                    parts.append(model.call_layer(layer, inp[:, t : t + 1], cache, x0[:, t : t + 1]))
                    mx.eval(parts[-1])
                out = mx.concatenate(parts, axis=1)
            own = out
            got = np.array(model.block_output(out)[0].astype(mx.float32), dtype=np.float64)
            ref = np.asarray(ref_hidden(s, b), dtype=np.float64).reshape(T, -1)
            sq[b] += float(((got - ref) ** 2).sum())
            del out, inp, got
    return sq
