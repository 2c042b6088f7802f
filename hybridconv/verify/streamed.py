"""verify's MLX side one block at a time (the streamed path).

hybridconv's model of the folder is built with every weight mapped lazily from
its safetensors (``loading.load(lazy=True)``: nothing is read), so only what a
computation touches is ever read. Then, block after block:

1. the block's weights are read — as stored: bf16, fp16, N-bit codes with their
   scales and biases — and, on the float32 compute path, upcast once to float32
   (``loading.upcast_model`` on the block: the same values the whole-model path
   computes with, one block's float32 copy in memory);
2. the **chained** pass: every sequence through the block exactly as the
   whole model runs it (:func:`.onepass.run_sequence`: a cached prefill of all
   but the last ``k`` tokens, then ``k`` single steps through the block's cache;
   sequences of one length as one batch), on the block's input from the chained
   pass so far; its output is compared with the reference's output of the block
   (the block table's relative error) and kept, on disk, as the next block's input;
3. the **second stage** (:func:`.onepass.own_block_errors`'s computation): every
   sequence through the block on the *reference's* input to it, with the same
   prefill and steps (and the same batches as the chained pass), compared with
   the reference's output (the block's own error). Whether it is needed is
   known only after the last block (a chained error over the gate), and it
   costs as much as the chained pass, so it starts in the chained pass's load
   from the first block whose chained error reaches a quarter of the gate
   (:data:`ARM_SHARE`; chained errors grow from block to block); when the pass
   ends over the gate, the blocks before that point are read again for theirs.
   Once started, it runs in the chained pass's batches (the chained input and the
   reference's input as one batch of twice the rows, where that fits the batch
   bound): one pass of single-token steps serves both. A conversion whose errors stay well within the gate (a correct float one)
   runs each block once. As in the whole-model path, the report shows (and
   gates on) the own errors only when a chained error exceeds the gate, so the
   verdict means the same;
4. the block's arrays are released.

Last, the final norm and the head on the chained output of the last block give
the logits, rows for rows what the whole model's prefill and steps give (the
head acts on each row alone), and the same metrics and decode check follow; on
the float32 path a head matrix larger than :data:`HEAD_SLICE_BYTES` in float32 is
multiplied a vocabulary slice at a time, each slice upcast when used.
Memory: the parameters outside the blocks as stored (embedding, final norm, head),
one block stored and in float32, one head slice in float32, and the activations
of one batch of sequences.

What a model must offer (hybridconv's :class:`hybridconv.models.common.CausalLM`
frame, which every architecture uses): ``embed``, ``layers``, ``call_layer``,
``layer_cache``, ``head`` and, where a block passes more than the residual
stream, ``block_output`` / ``block_input``; and no ``__call__`` of its own (its
forward is the frame's: blocks in order).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import interrupt
from ..errors import UsageError


@dataclass
class Measurement:
    """What one runtime's pass over the reference's sequences measured, whichever
    path computed it: per-sequence token statistics, decode rows, per-block sums of
    squared differences (chained), their reference norms, the block outputs' dtypes
    and, for the second stage, either its sums (computed already) or a function
    computing them (the whole-model path runs it only when needed)."""

    stats: list = field(default_factory=list)
    decode_rows: list = field(default_factory=list)
    steps_run: list = field(default_factory=list)
    sq_diff: np.ndarray | None = None
    sq_ref: np.ndarray | None = None
    dtypes: list = field(default_factory=list)
    own: object = None  # np.ndarray of squared differences, or a callable returning them
    seconds: dict = field(default_factory=dict)
    seconds_note: str | None = None


def streamable(model) -> str | None:
    """None when ``model`` can run one block at a time, else why not."""
    from ..models.common import CausalLM

    if not isinstance(model, CausalLM):
        return f"{type(model).__name__} is not built on hybridconv's CausalLM frame"
    if type(model).__call__ is not CausalLM.__call__:
        return f"{type(model).__name__} has a forward of its own (not the frame's blocks in order)"
    return None


def _block_output(model, h):
    fn = getattr(model, "block_output", None)
    return fn(h) if fn is not None else h


def _block_input(model, reference, own):
    fn = getattr(model, "block_input", None)
    return fn(reference, own) if fn is not None else reference


class _Carry:
    """Per-batch arrays carried from block to block (the chained outputs, the second
    stage's outputs, the embeddings), on disk in a temporary folder: float32 holds
    bf16/fp16 activations exactly, and each is cast back to the dtype it had."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.dtype: dict = {}

    def put(self, key: str, arr) -> None:
        import mlx.core as mx

        from ..resources import full_disk_error

        self.dtype[key] = arr.dtype
        path = self.folder / f"{key}.npy"
        try:
            np.save(path, np.array(arr.astype(mx.float32)))
        except OSError as exc:
            err = full_disk_error(exc, self.folder, 3 * arr.size * 4)
            if err is None:
                raise
            raise err from None

    def get(self, key: str):
        import mlx.core as mx

        return mx.array(np.load(self.folder / f"{key}.npy")).astype(self.dtype[key])


def _batch_limit(length: int, vocab: int, hidden: int) -> int:
    """How many sequences of ``length`` tokens may run as one batch: their logits and
    block outputs under :data:`.onepass.BATCH_BYTES` (as the whole-model path)."""
    from .onepass import BATCH_BYTES, MAX_BATCH

    if vocab <= 0:
        return 1
    per_seq = length * 4 * (max(vocab, 1) + 4 * hidden)
    return max(1, min(MAX_BATCH, BATCH_BYTES // max(per_seq, 1)))


def _batches(sequences, k: int, vocab: int, hidden: int) -> list[tuple[int, int]]:
    """(first, end) index ranges of the sequences run together: consecutive ones of one
    length whose outputs fit :data:`.onepass.BATCH_BYTES` (as the whole-model path)."""
    out, i = [], 0
    while i < len(sequences):
        T = len(sequences[i])
        limit = _batch_limit(T, vocab, hidden)
        j = i + 1
        while j < len(sequences) and j - i < limit and len(sequences[j]) == T:
            j += 1
        out.append((i, j))
        i = j
    return out


def _through(model, layer, inp, x0, k: int, whole_if_stateless: bool):
    """One block on ``inp [B, T, H]``: a cached prefill of ``T - k`` rows then ``k``
    single steps (as :func:`.onepass.run_sequence` runs the model); ``k == 0`` (or,
    with ``whole_if_stateless``, a block without a cache, as the second stage of the
    whole-model path calls it): one call."""
    import mlx.core as mx

    T = inp.shape[1]
    cache = model.layer_cache(layer) if k else None
    if k == 0 or (cache is None and whole_if_stateless):
        out = model.call_layer(layer, inp, cache, x0)
        mx.eval(out)
        return out
    parts = [model.call_layer(layer, inp[:, : T - k], cache, x0[:, : T - k])]
    mx.eval(parts[-1])
    for t in range(T - k, T):
        interrupt.check()
        parts.append(model.call_layer(layer, inp[:, t : t + 1], cache, x0[:, t : t + 1]))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=1)


# The head's matrix, when its float32 form is larger than this, is multiplied in
# vocabulary slices, each upcast (or dequantized) when used: the float32 copy of a
# 256k x 2560 embedding alone is 2.6 GB, more than the rest of the streamed MLX side.
HEAD_SLICE_BYTES = 256 << 20


def _head_matrix(model):
    """The head's projection module when :func:`_sliced_head` can slice it (the
    frame's own head: final norm, one matrix — the tied embedding or ``lm_head`` —,
    then ``scale_logits``), else None."""
    from ..models.common import CausalLM

    if type(model).head is not CausalLM.head:
        return None
    proj = getattr(model.trunk, model.embedding_name) if model.tied else getattr(model, "lm_head", None)
    if proj is None or "weight" not in proj or proj["weight"].ndim != 2:
        return None
    if "scales" in proj and getattr(proj, "mode", "affine") != "affine":
        return None
    return proj


def _head(model, h, dtype, upcast: bool):
    """``model.head(h, dtype)``; on the float32 path with a head matrix over
    :data:`HEAD_SLICE_BYTES` in float32, the same product in vocabulary slices (each
    slice's rows upcast or dequantized when used), then ``scale_logits`` on the whole."""
    import mlx.core as mx

    from ..float32_compute import _dequantize_f32

    proj = _head_matrix(model) if upcast else None
    vocab = proj["weight"].shape[0] if proj is not None else 0
    width = h.shape[-1]
    if proj is None or vocab * width * 4 <= HEAD_SLICE_BYTES:
        return model.head(h, dtype)
    x = model.final_norm(h, dtype).astype(mx.float32)
    rows = max(1, HEAD_SLICE_BYTES // (width * 4))
    parts = []
    for a in range(0, vocab, rows):
        b = min(vocab, a + rows)
        w = _dequantize_f32(proj, mx.arange(a, b)) if "scales" in proj else proj["weight"][a:b].astype(mx.float32)
        y = x @ w.T
        if "bias" in proj:
            y = y + proj["bias"][a:b].astype(mx.float32)
        mx.eval(y)
        parts.append(y)
        del w
    return model.scale_logits(mx.concatenate(parts, axis=-1))


def _release(layer) -> None:
    """Drop a block's arrays (their memory), leaving empty placeholders."""
    import mlx.core as mx
    from mlx.utils import tree_map

    layer.update(tree_map(lambda _: mx.zeros((0,)), layer.parameters()))


# The second stage starts in the chained pass's load once a block's chained error
# reaches this share of the block gate: from there the gate is likely to be
# crossed, and the blocks' own errors are then needed.
ARM_SHARE = 0.25


def _load_block(layer, upcast: bool) -> None:
    import mlx.core as mx

    from ..loading import upcast_model

    if upcast:
        upcast_model(layer)
    mx.eval(layer.parameters())


def _own_input(model, b: int, i: int, j: int, bi: int, carry, reference, m: Measurement):
    """Block ``b``'s input on the reference's side for sequences ``i:j`` (batch
    ``bi``): the reference's output of block ``b - 1`` (the embeddings for block 0),
    joined with the previous block's own output where the model passes more."""
    import mlx.core as mx

    if b == 0:
        return carry.get(f"x0-{bi}")
    prev = np.stack([np.asarray(reference.hidden(s, b - 1), dtype=np.float32) for s in range(i, j)])
    own = carry.get(f"own-{bi}") if f"own-{bi}" in carry.dtype else None  # (from block 0 where used)
    return _block_input(model, mx.array(prev).astype(m.dtypes[b - 1]), own)


def _score_own(model, out, b: int, i: int, bi: int, carry, reference, m: Measurement) -> None:
    """Block ``b``'s output on the reference's input against the reference's output:
    squared differences into ``m.own[b]``; kept as the next block's ``own`` input."""
    import mlx.core as mx

    got = np.array(_block_output(model, out).astype(mx.float32), dtype=np.float64)
    for r in range(got.shape[0]):
        ref = np.asarray(reference.hidden(i + r, b), dtype=np.float64)
        m.own[b] += float(((got[r] - ref) ** 2).sum())
    carry.put(f"own-{bi}", out)


def _own_pass(model, layer, b: int, batches, carry, reference, m: Measurement, ks, done=frozenset()) -> None:
    """Block ``b`` on the reference's input to it, as :func:`.onepass.own_block_errors`
    runs it: its squared differences into ``m.own[b]``; the batches in ``done`` (by
    index) ran it already, with the chained pass."""
    for bi, (i, j) in enumerate(batches):
        if bi in done:
            continue
        interrupt.check()
        inp = _own_input(model, b, i, j, bi, carry, reference, m)
        out = _through(model, layer, inp, carry.get(f"x0-{bi}"), ks[i], True)
        _score_own(model, out, b, i, bi, carry, reference, m)
        del out, inp


def _joint(model, layer, k: int, rows: int, length: int, vocab: int, hidden: int) -> bool:
    """Whether block ``layer``'s chained pass and second stage over one batch of
    ``rows`` sequences can run as one batch of ``2 * rows``: it fits the batch bound
    (:data:`.onepass.BATCH_BYTES`), and the block keeps a cache or runs in one call
    (a stateless block's second stage is one call, as in the whole-model path)."""
    return 2 * rows <= _batch_limit(length, vocab, hidden) and (k == 0 or model.layer_cache(layer) is not None)


def measure_streamed(model, reference, decode_steps: int, upcast: bool, progress=None, block_gate=None,
                     reopen=None) -> Measurement:
    """The chained pass, the second stage and the logits of ``model`` (a lazily loaded
    hybridconv model: ``loading.load(lazy=True)``), one block at a time (module
    docstring), against ``reference``; ``upcast``: hold each block's weights in
    float32 while it runs (the float32 compute path).

    The second stage (each block on the reference's input) runs in the same load as
    the chained pass from the first block whose chained error reaches
    :data:`ARM_SHARE` of ``block_gate`` (from the first block when ``block_gate`` is
    None or the model passes more than the residual between blocks); if the chained
    pass ends over the gate, the blocks before that point are read again (from
    ``reopen()``, a fresh lazily loaded model) for theirs. A verify whose chained
    errors stay well within the gate runs every block once."""
    import mlx.core as mx

    from ..models.common import CausalLM
    from .metrics import relative_error, token_stats
    from .onepass import decode_check

    why = streamable(model)
    if why:
        raise UsageError(f"verify cannot run this model one block at a time: {why}", "use --no-stream")
    seqs = reference.sequences
    have_hidden = reference.hidden_files is not None
    layers = model.layers
    n = len(layers)
    m = Measurement(sq_diff=np.zeros(n), sq_ref=np.zeros(n), own=np.zeros(n) if have_hidden else None)
    sec = m.seconds
    for key in ("load", "blocks", "second_stage", "head_and_metrics"):
        sec[key] = 0.0
    hidden_size = reference.hidden(0, 0).shape[-1] if have_hidden else 0
    batches = _batches(seqs, decode_steps, reference.vocab_size, hidden_size)
    ks = [max(0, min(decode_steps, len(s) - 1)) for s in seqs]
    # a block that reads the previous block's own output beside the reference's
    # (block_input) needs the second stage from the first block on
    chained_own = getattr(type(model), "block_input", None) is not getattr(CausalLM, "block_input", None)
    armed = have_hidden and (block_gate is None or chained_own or reopen is None)
    own_done: list[int] = []
    joint_rows: set = set()  # (block, batch) whose second stage ran with the chained pass
    with tempfile.TemporaryDirectory(prefix="hybridconv-verify-") as tmp:
        carry = _Carry(Path(tmp))
        t = time.perf_counter()
        for bi, (i, j) in enumerate(batches):
            x0 = model.embed(mx.array(np.stack(seqs[i:j])))
            mx.eval(x0)
            carry.put(f"x0-{bi}", x0)
            carry.put(f"chain-{bi}", x0)
        sec["load"] += time.perf_counter() - t
        for b, layer in enumerate(layers):
            interrupt.check()  # a safe point: between blocks
            t = time.perf_counter()
            _load_block(layer, upcast)
            sec["load"] += time.perf_counter() - t
            t = time.perf_counter()
            joint = armed and b > 0  # the second stage runs in the same batches as the chained pass
            for bi, (i, j) in enumerate(batches):
                interrupt.check()  # a safe point: between sequences
                x0 = carry.get(f"x0-{bi}")
                if joint and _joint(model, layer, ks[i], j - i, len(seqs[i]), reference.vocab_size, hidden_size):
                    # the chained input and the reference's input as one batch: one
                    # pass of single-token steps for both (each weight read once per step)
                    chain_in = carry.get(f"chain-{bi}")
                    own_in = _own_input(model, b, i, j, bi, carry, reference, m).astype(chain_in.dtype)
                    both = _through(model, layer, mx.concatenate([chain_in, own_in]), mx.concatenate([x0, x0]),
                                    ks[i], False)
                    out, own_out = both[: j - i], both[j - i:]
                    _score_own(model, own_out, b, i, bi, carry, reference, m)
                    joint_rows.add((b, bi))
                    del both, chain_in, own_in, own_out
                else:
                    out = _through(model, layer, carry.get(f"chain-{bi}"), x0, ks[i], False)
                if len(m.dtypes) <= b:
                    m.dtypes.append(out.dtype)
                if have_hidden:
                    got = np.array(_block_output(model, out).astype(mx.float32), dtype=np.float64)
                    for r in range(j - i):
                        ref = np.asarray(reference.hidden(i + r, b), dtype=np.float64)
                        m.sq_diff[b] += float(((got[r] - ref) ** 2).sum())
                        m.sq_ref[b] += float((ref**2).sum())
                carry.put(f"chain-{bi}", out)
                del out
            sec["blocks"] += time.perf_counter() - t
            if have_hidden and not armed:
                armed = relative_error(m.sq_diff[b], m.sq_ref[b]) >= ARM_SHARE * block_gate
            if armed:
                t = time.perf_counter()
                _own_pass(model, layer, b, batches, carry, reference, m, ks, {bi for bb, bi in joint_rows if bb == b})
                own_done.append(b)
                sec["second_stage"] += time.perf_counter() - t
            _release(layer)  # its arrays go with their last reference (no gc pass: 0.4 s each
            mx.clear_cache()  # with torch loaded), and MLX's buffer cache returns them
            if progress:
                progress(f"block {b + 1}/{n}")
        chained = [relative_error(m.sq_diff[b], m.sq_ref[b]) for b in range(n)]
        missing = [b for b in range(n) if b not in own_done]
        if have_hidden and missing and max(chained, default=0.0) > block_gate:
            # the second stage is needed, and the blocks before the point where it
            # started are read again for it
            t = time.perf_counter()
            again = reopen()
            for b in missing:
                interrupt.check()
                if progress:
                    progress(f"blocks on the reference's inputs: block {b + 1}/{n}")
                layer = again.layers[b]
                _load_block(layer, upcast)
                _own_pass(again, layer, b, batches, carry, reference, m, ks)
                _release(layer)
                mx.clear_cache()
            del again
            sec["second_stage"] += time.perf_counter() - t
        if have_hidden:
            in_batches = len({b for b, _ in joint_rows})
            m.seconds_note = (f"second stage: {len(own_done)} of {n} blocks in the chained pass's load"
                              + (f" ({in_batches} in its batches: their time is under blocks)" if in_batches else "")
                              + (f", {len(missing)} read again" if missing and max(chained, default=0.0) > block_gate
                                 else ""))
        t = time.perf_counter()
        for bi, (i, j) in enumerate(batches):
            interrupt.check()
            h = carry.get(f"chain-{bi}")
            x0 = carry.get(f"x0-{bi}")
            got = np.array(_head(model, h, x0.dtype, upcast).astype(mx.float32))
            del h
            for r in range(j - i):
                s = i + r
                st = token_stats(reference.outputs[s], got[r], seqs[s])
                m.stats.append(st)
                if ks[s] > 0:
                    m.decode_rows.append(decode_check(got[r], seqs[s], ks[s], reference.outputs[s]))
                    m.steps_run.append(ks[s])
            del got
        sec["head_and_metrics"] += time.perf_counter() - t
    return m


# --- memory: whole model or one block at a time ------------------------------------------

MLX_HINT = "use a machine with more memory, or fewer or shorter inputs"


def estimate_mlx(out: Path, config: dict, float32: bool, held_float32: bool, reference) -> tuple[int, int]:
    """(whole-model, streamed) bytes for hybridconv's MLX model of ``out``, from its
    safetensors headers: the weights as stored (or in float32 when ``held_float32``:
    upcast once at load), on the float32 path a block's float32 copy (made per call,
    or per block when streamed), the parameters outside the blocks, and the
    activations of the largest batch of sequences (logits and block outputs)."""
    from ..checkpoint import index_weights
    from ..converters import layer_of

    quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    bits = quant.get("bits", 4) if quant else None
    stored: dict = {}
    wide: dict = {}
    widest_global = 0
    for name, t in index_weights(Path(out)).tensors.items():
        b = layer_of(name)
        stored[b] = stored.get(b, 0) + t.nbytes
        unpacked = t.numel * (32 // bits) if (bits and t.dtype == "U32") else t.numel
        wide[b] = wide.get(b, 0) + unpacked * 4
        if b is None:
            widest_global = max(widest_global, unpacked * 4)
    g_stored, g_wide = stored.pop(None, 0), wide.pop(None, 0)
    # streamed, the head's matrix is upcast a vocabulary slice at a time (_head)
    g_wide_streamed = g_wide - widest_global + min(widest_global, HEAD_SLICE_BYTES)
    block_stored = max(stored.values(), default=0)
    block_wide = max(wide.values(), default=0)
    seqs = reference.sequences
    vocab = max(reference.vocab_size, config.get("vocab_size", 0))
    hidden = config.get("hidden_size", 0)
    batch = max(j - i for i, j in _batches(seqs, 0, reference.vocab_size, hidden)) if seqs else 1
    longest = max(len(s) for s in seqs)
    acts = batch * longest * (3 * vocab * 4 + 32 * hidden * 4)
    # streamed, the second stage may run in the chained pass's batches (twice the rows)
    joint = 2 * batch if 2 * batch <= _batch_limit(longest, reference.vocab_size, hidden) else batch
    total_stored = g_stored + sum(stored.values())
    total_wide = g_wide + sum(wide.values())
    if held_float32:
        whole = total_wide + acts
    else:
        whole = total_stored + (block_wide if float32 else 0) + (g_wide if float32 else 0) + acts
    streamed = g_stored + (g_wide_streamed if float32 else 0) + block_stored + (block_wide if float32 else 0) \
        + acts * joint // batch
    return int(whole), int(streamed)
