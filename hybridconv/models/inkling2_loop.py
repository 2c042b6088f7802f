"""Inkling-2-Mini (Thinking Machines, ``inkling2_loop_text``): Inkling-2 whose
middle layers run several times ("looped" layers), each later pass receiving
messages from the one before.

Everything inside a layer is Inkling-2's (:mod:`hybridconv.models.inkling2`);
the reference is transformers' ``modeling_inkling2_loop.py``.

Schedule
--------
Layers ``loop_layer_index_start ≤ i < loop_layer_index_end`` (both multiples of
``n_layers_per_attn_res_block``, the start > 0) run ``loop_num_passes`` times;
the others once::

    pre layers → pass 1 of the loop layers → pass 2 … → post layers

Every pass starts again from the state ``S_0 = (p, B)`` the pre layers left (the
partial block sum and the finished blocks of the attention residuals). Pass
``j ≥ 2`` also reads the state its predecessor ended with, ``S = (p, B)``: for
loop layer ``i``, four learned queries (``message_input``: q, k, v and MLP, from
the checkpoint's ``middle_cycle_cross_pass_queries`` — q and MLP of each loop
layer — and ``…_kv_queries`` — k and v) attend over ``[B[n_0 + 1:], p]`` (the
blocks the previous pass added after the first, and its partial sum; ``n_0`` =
the blocks of ``S_0``), as an attention residual does, into four messages. A
loop layer mixes each message into the matching input with a *message gate*::

    g = down_proj([rmsnorm(h), rmsnorm(m)])                  (rank loop_gate_rank)
    h ← (1 − tanh(forget_gate_proj(g))) ⊙ h + tanh(message_gate_proj(g)) ⊙ m

(float32; ``q/k/v_message_gate`` after the attention residual — before the q/k/v
input norms of a full layer, before the input norm of a sliding one —,
``mlp_message_gate`` after the MLP's attention residual). Pass 1 has no messages.

Blocks, caches and verify
-------------------------
A *block* here is one layer run, in the order they run: ``num_hidden_layers +
(loop_num_passes − 1) · (end − start)`` blocks (8 for 6 layers with layers 2–3
looped twice), the loop layers' weights shared by their runs. transformers'
forward hook on a looped decoder layer fires once per run in the same order, so
verify compares block ``b`` with the ``b``-th layer output the reference
produced. Each run has its own cache (keys/values and conv histories), as
transformers appends a copy of the loop layers' cache layers per extra pass.

What passes between blocks is one array ``[B, T, slots, D]``: the current
``(p, B)`` (slot 0 is ``p``, what :meth:`Model.block_output` gives verify), then,
inside the loop, the saved ``S_0`` (while another pass follows) and, in passes
``j ≥ 2``, the previous pass's ``(p, B[n_0 + 1:])`` the messages come from. The
slot counts are fixed by the schedule (:class:`Run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import inkling2
from .inkling2 import DecoderLayer, attention_residual, pack, unpack, unweighted_rms_norm


@dataclass
class ModelArgs(inkling2.ModelArgs):
    model_type: str = "inkling2_loop_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    swa_num_attention_heads: int = 24
    log_scaling_n_floor: Optional[int] = 8192
    moe_intermediate_size: int = 1152
    n_routed_experts: int = 128
    loop_layer_index_start: int = 6
    loop_layer_index_end: int = 18
    loop_num_passes: int = 3
    loop_gate_rank: int = 64


@dataclass(frozen=True)
class Run:
    """One run of a layer in the unrolled schedule: ``layer`` (its index), ``pass_``
    (0 outside the loop), ``loop_index`` (position within the loop, or None),
    the slot counts of its input and output streams (``cur``: ``1 +`` finished
    blocks; ``snap``: the saved pre-loop state; ``prev``: the previous pass's
    state), and whether it starts a pass ≥ 2 (``restart``) or pass 1 (``save``)."""

    layer: int
    pass_: int
    loop_index: Optional[int]
    cur_in: int
    snap_in: int
    prev_in: int
    snap_out: int
    prev_out: int
    restart: bool
    save: bool
    blocks_at_loop: int  # n_0: finished blocks of the pre-loop state


def unrolled(args) -> list[Run]:
    """The layer runs in order (module docstring)."""
    n, s, e, P = (args.n_layers_per_attn_res_block, args.loop_layer_index_start, args.loop_layer_index_end,
                  args.loop_num_passes)
    L = e - s
    boundaries_before = lambda i: 0 if i == 0 else (i - 1) // n + 1  # noqa: E731  finished blocks entering layer i
    n0 = boundaries_before(s)
    runs = []
    for i in range(s):
        runs.append(Run(i, 0, None, 1 + boundaries_before(i), 0, 0, 0, 0, False, False, n0))
    for j in range(P):
        more = j < P - 1
        for k in range(L):
            i = s + k
            first, last = k == 0, k == L - 1
            cur_in = 1 + (boundaries_before(e) if (first and j > 0) else boundaries_before(i))
            snap_in = 0 if (first and j == 0) or P == 1 else 1 + n0
            prev_in = 0 if (j == 0 or first) else 1 + boundaries_before(e) - n0 - 1
            snap_out = (1 + n0) if (P > 1 and (more or not last)) else 0
            prev_out = (1 + boundaries_before(e) - n0 - 1) if (j > 0 and not last) else 0
            runs.append(Run(i, j, k, cur_in, snap_in, prev_in, snap_out, prev_out, first and j > 0,
                            first and j == 0 and P > 1, n0))
    for i in range(e, args.num_hidden_layers):
        runs.append(Run(i, 0, None, 1 + boundaries_before(i), 0, 0, 0, 0, False, False, n0))
    return runs


def layer_schedule(args) -> list[str]:
    return ["attention"] * len(unrolled(args))


def layer_windows(args) -> list[Optional[int]]:
    return [args.sliding_window_size if args.layer_types[r.layer] == "hybrid_sliding" else None
            for r in unrolled(args)]


class MessageGate(nn.Module):
    """``(1 − tanh(forget)) ⊙ h + tanh(gain) ⊙ m`` from a low-rank view of both (float32)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, R = args.hidden_size, args.loop_gate_rank
        self.eps = args.rms_norm_eps
        self.down_proj = nn.Linear(2 * D, R, bias=False)
        self.forget_gate_proj = nn.Linear(R, D, bias=False)
        self.message_gate_proj = nn.Linear(R, D, bias=False)

    def __call__(self, h: mx.array, m: mx.array) -> mx.array:
        h, m = h.astype(mx.float32), m.astype(mx.float32)
        x = mx.concatenate([unweighted_rms_norm(h, self.eps), unweighted_rms_norm(m, self.eps)], axis=-1)
        g = self.down_proj(x.astype(self.down_proj.weight.dtype)).astype(mx.float32)
        forget = mx.tanh(self.forget_gate_proj(g).astype(mx.float32))
        gain = mx.tanh(self.message_gate_proj(g).astype(mx.float32))
        return (1 - forget) * h + gain * m


class LoopDecoderLayer(DecoderLayer):
    """An Inkling-2 layer with the four message gates of a loop layer."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.q_message_gate = MessageGate(args)
        self.k_message_gate = MessageGate(args)
        self.v_message_gate = MessageGate(args)
        self.mlp_message_gate = MessageGate(args)

    def message(self, name: str, h: mx.array, messages: Optional[mx.array]) -> mx.array:
        if messages is None:
            return h
        m = messages[..., ("q", "k", "v", "mlp").index(name), :]
        return getattr(self, f"{name}_message_gate")(h, m)


class MessageInput(nn.Module):
    """The message queries as the checkpoints store them: ``queries [2L, D]``
    (q and MLP of each loop layer) and ``kv_queries [2L, D]`` (k and v)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        L = args.loop_layer_index_end - args.loop_layer_index_start
        self.queries = mx.zeros((2 * L, args.hidden_size))
        self.kv_queries = mx.zeros((2 * L, args.hidden_size))

    def __call__(self, prev: mx.array, loop_index: int) -> mx.array:
        """The four messages ``[B, T, 4, D]`` (q, k, v, MLP) for loop layer ``loop_index``."""
        i = 2 * loop_index
        q = mx.stack([self.queries[i], self.kv_queries[i], self.kv_queries[i + 1], self.queries[i + 1]])
        blocks = prev[..., 1:, :] if prev.shape[-2] > 1 else None
        return attention_residual(q, blocks, prev[..., 0, :])


class LayerRun:
    """One block of the unrolled schedule: a view of a (shared) layer that knows
    its run (:class:`Run`). Not a module: the weights belong to the layer."""

    def __init__(self, model: "Model", layer: DecoderLayer, run: Run):
        self.model, self.layer, self.run = model, layer, run
        self.kind, self.window = layer.kind, layer.window

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        r = self.run
        x = x[..., None, :] if x.ndim == 3 else x
        cur = x[..., : r.cur_in, :]
        snap = x[..., r.cur_in : r.cur_in + r.snap_in, :]
        prev = x[..., r.cur_in + r.snap_in :, :]
        if r.save:
            snap = cur
        if r.restart:  # pass ≥ 2 starts from the saved state; the ended pass sends messages
            prev = mx.concatenate([cur[..., :1, :], cur[..., 2 + r.blocks_at_loop :, :]], axis=-2)
            cur = snap
        messages = None
        if r.pass_ > 0:
            messages = self.model.model.message_input(prev, r.loop_index)
        p, blocks = unpack(cur if cur.shape[-2] > 1 else cur[..., 0, :])
        p, blocks = self.layer.step(p, blocks, cache, messages)
        out = pack(p, blocks)
        out = out[..., None, :] if out.ndim == 3 else out
        parts = [out]
        if r.snap_out:
            parts.append(snap.astype(out.dtype))
        if r.prev_out:
            parts.append(prev.astype(out.dtype))
        return mx.concatenate(parts, axis=-2) if len(parts) > 1 else out


class Model(inkling2.Model):
    """Inkling-2-Mini for causal LM: Inkling-2 with looped layers. ``layers`` are
    the layer *runs* (blocks); the weights live in ``model.layers``."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model.message_input = MessageInput(args)
        # plain attribute, not module state: the runs share the layers' weights
        runs = [LayerRun(self, self.model.layers[r.layer], r) for r in unrolled(args)]
        object.__setattr__(self, "_runs", runs)

    @staticmethod
    def build_layer(args: ModelArgs, layer: int) -> DecoderLayer:
        loop = args.loop_layer_index_start <= layer < args.loop_layer_index_end
        return (LoopDecoderLayer if loop else DecoderLayer)(args, layer)

    @property
    def layers(self) -> list:
        return self._runs

    def layer_cache(self, run: LayerRun):
        return super().layer_cache(run.layer)
