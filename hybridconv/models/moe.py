"""Mixture-of-experts: routing, stacked experts as gathered matmuls, and the block.

A sparse MoE layer (Shazeer et al. 2017, "Outrageously Large Neural Networks";
Fedus et al. 2021, "Switch Transformers") replaces one feed-forward network by
``E`` experts and a router. For every token ``x`` the router computes logits
``l = W_r x`` (``W_r``: ``[E, H]``), chooses ``k`` experts and weights, and the
layer returns ``y = Σ_{e ∈ topk} w_e · FFN_e(x)`` (+ an always-on shared expert,
below). The architectures differ only in *how* ``(indices, weights)`` come from
``l``, so :func:`route` is the one place those rules live. Each option below is
checked against the transformers router it reproduces (tests/test_moe.py):

``score="softmax"``
    ``p = softmax(l)`` over all ``E`` experts, the ``k`` largest chosen, weights
    ``p_e`` as they are (Jamba, Mixtral: ``norm_topk=False``) or renormalised to
    sum to one over the chosen ``k`` (Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE with
    ``norm_topk_prob``: ``norm_topk=True``).
``score="softmax_topk"``
    the ``k`` largest *logits* chosen, weights ``softmax`` over those ``k`` only
    (GraniteMoe / GraniteMoeHybrid's ``TopKGating``). Equal to ``softmax`` with
    renormalisation in exact arithmetic; kept separate because it is computed
    that way in the reference.
``score="sigmoid"``
    ``s = σ(l)`` per expert, independent of the others (DeepSeek-V3, Liu et al.
    2024, §2.1.2; Nemotron-H, Kimi-Linear, LFM2-MoE). With a *score correction
    bias* ``b`` (DeepSeek-V3's auxiliary-loss-free load balancing; LFM2-MoE's
    ``expert_bias``; ``e_score_correction_bias`` elsewhere) the experts are
    chosen by ``s + b`` but weighted by the uncorrected ``s``: the bias steers
    load, never the mixture. ``norm_topk`` divides by ``Σ s_e + norm_eps`` over
    the chosen (``norm_eps``: 1e-6 in LFM2-MoE, 1e-20 in DeepSeek-V3 /
    Nemotron-H / Kimi-Linear, 0 for Qwen), then ``routed_scaling`` multiplies.
``skip_experts``
    the last ``skip_experts`` of the ``E`` scores belong to experts that
    compute nothing (ZAYA1's "skip expert", Zyphra 2025): they are scored and
    chosen like the others, and a token routed to one gets weight 0 there (its
    index is replaced by 0, a real expert, so the stacked experts are never
    indexed out of range).
``n_group`` / ``topk_group``
    DeepSeek-V3's node-limited routing: the experts form ``n_group`` equal
    groups, a group's score is the sum of its two best (corrected) scores, only
    experts of the ``topk_group`` best groups can be chosen. ``n_group=1`` is
    plain top-k.

Routing runs in float32 whatever the activations are (every reference casts the
router's scores to float32). Which of ``k`` experts is listed first is not
specified (``argpartition``): the weighted sum does not depend on the order.

Experts are stored stacked, ``[E, out, in]`` per projection (mlx-lm's
``SwitchLinear`` layout and names, so its ``QuantizedSwitchLinear`` and ours
read the same files), and run with ``mx.gather_mm``: each token's ``k`` rows
are multiplied by the ``k`` chosen expert matrices in one call, never a Python
loop over experts. For 64 or more (token, expert) pairs the pairs are first
sorted by expert (as mlx-lm does) so that each expert's matrix is read once.
The converter stacks the per-expert checkpoint tensors into this layout
(``converters.rules.StackExperts``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

SCORES = ("softmax", "softmax_topk", "sigmoid")


def _topk_indices(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


def route(
    logits: mx.array,
    top_k: int,
    *,
    score: str = "softmax",
    norm_topk: bool = False,
    correction_bias: Optional[mx.array] = None,
    routed_scaling: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    norm_eps: float = 0.0,
    skip_experts: int = 0,
) -> tuple[mx.array, mx.array]:
    """Choose ``top_k`` experts per token from router ``logits`` ``[..., E]``.

    Returns ``(indices [..., k] uint32, weights [..., k] float32)``; the rules
    for each ``score`` are in the module docstring. ``correction_bias`` (``[E]``)
    changes only which experts are chosen."""
    if score not in SCORES:
        raise ValueError(f"route: score {score!r} is not one of {SCORES}")
    E = logits.shape[-1]
    if not 1 <= top_k <= E:
        raise ValueError(f"route: top_k {top_k} must be in 1..{E}")
    logits = logits.astype(mx.float32)
    if score == "softmax_topk":
        choice = logits if correction_bias is None else logits + correction_bias.astype(mx.float32)
        inds = mx.stop_gradient(_topk_indices(choice, top_k))
        weights = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
        return inds, weights * routed_scaling if routed_scaling != 1.0 else weights
    scores = mx.softmax(logits, axis=-1, precise=True) if score == "softmax" else mx.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.astype(mx.float32)
    if n_group > 1:
        if E % n_group:
            raise ValueError(f"route: {E} experts do not split into {n_group} groups")
        grouped = choice.reshape(*choice.shape[:-1], n_group, E // n_group)
        best2 = mx.sort(grouped, axis=-1)[..., -min(2, E // n_group):]
        group_scores = best2.sum(axis=-1)  # [..., n_group]
        drop = mx.argpartition(group_scores, kth=n_group - topk_group - 1, axis=-1)[..., : n_group - topk_group] \
            if topk_group < n_group else None
        if drop is not None:
            masked = mx.put_along_axis(
                grouped, mx.expand_dims(drop, -1), mx.array(-math.inf, grouped.dtype), axis=-2
            )
            choice = masked.reshape(choice.shape)
    inds = mx.stop_gradient(_topk_indices(choice, top_k))
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if norm_topk:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + norm_eps)
    if routed_scaling != 1.0:
        weights = weights * routed_scaling
    if skip_experts:
        skip = inds >= E - skip_experts
        weights = mx.where(skip, mx.array(0.0, weights.dtype), weights)
        inds = mx.where(skip, mx.array(0, inds.dtype), inds)
    return inds, weights


def route_sigmoid_sink(
    logits: mx.array,
    top_k: int,
    n_shared: int,
    *,
    correction_bias: Optional[mx.array] = None,
    scale: float = 1.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """Inkling's routing with a *shared-expert sink* (thinkingmachines, Inkling;
    transformers' ``InklingTopkRouter``). ``logits`` ``[..., E + S]``: the router
    scores the ``S`` always-on shared experts beside the ``E`` routed ones. The
    ``top_k`` routed experts are chosen by ``σ(l_e) + correction_bias``; then the
    chosen and the shared experts share one normalisation::

        w_i = σ(l_i) / Σ_{j ∈ chosen ∪ shared} σ(l_j) · scale

    (computed as a softmax of log-sigmoids, as the reference does), so the shared
    experts act as a sink that takes weight from the routed ones. Returns
    ``(indices [..., k], routed weights [..., k], shared weights [..., S])``,
    float32."""
    logits = logits.astype(mx.float32)
    E = logits.shape[-1] - n_shared
    if not 1 <= top_k <= E:
        raise ValueError(f"route_sigmoid_sink: top_k {top_k} must be in 1..{E}")
    routed, shared = logits[..., :E], logits[..., E:]
    choice = mx.sigmoid(routed)
    if correction_bias is not None:
        choice = choice + correction_bias.astype(mx.float32)
    inds = mx.stop_gradient(_topk_indices(choice, top_k))
    chosen = mx.concatenate([mx.take_along_axis(routed, inds, axis=-1), shared], axis=-1)
    w = mx.softmax(-mx.logaddexp(mx.array(0.0, mx.float32), -chosen), axis=-1, precise=True) * scale
    return inds, w[..., :top_k], w[..., top_k:]


# --- stacked experts -----------------------------------------------------------------


class QuantizedSwitchLinear(nn.Module):
    """:class:`SwitchLinear` with quantized weights (``mx.gather_qmm``); each
    expert matrix is quantized group-wise along its input axis, as mlx-lm does."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases and biases[0] is not None:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


class SwitchLinear(nn.Module):
    """``E`` linear maps stored as one ``weight [E, out, in]`` (+ ``bias [E, out]``);
    ``x @ weight[indices].T`` for each row's expert index."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self["weight"]
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm runs float32 only (0.32: "Currently only supports
            # float32"); compute there in float32 and return the activations' dtype.
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
                             rhs_indices=indices, sorted_indices=sorted_indices).astype(x.dtype)
        else:
            y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        q = QuantizedSwitchLinear(self.weight, group_size, bits, mode)
        if "bias" in self:
            q.bias = self.bias
        return q


def _sort_by_expert(x: mx.array, indices: mx.array):
    """Flatten (token, slot) pairs and sort them by expert (mlx-lm's ``_gather_sort``)."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)


def _run_experts(x: mx.array, indices: mx.array, body: Callable) -> mx.array:
    """``x [..., H]``, ``indices [..., k]`` -> ``[..., k, H_out]`` through ``body(x, idx, sorted)``."""
    x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, H]: one row, broadcast over the k slots
    indices = mx.stop_gradient(indices)
    if indices.size >= 64:
        xs, idx, inv = _sort_by_expert(x, indices)
        y = body(xs, idx, True)[inv]
        y = mx.unflatten(y, 0, indices.shape)
    else:
        y = body(x, indices, False)
    return y.squeeze(-2)


class SwitchGLU(nn.Module):
    """Gated experts: ``down(act(gate(x)) * up(x))`` per chosen expert
    (SwiGLU with ``activation=nn.silu``, Shazeer 2020). ``limit``: the clamped
    SwiGLU of GLM-5.3-Flash (and GPT-OSS): ``gate ≤ limit``, ``up ∈ [−limit, limit]``
    before the product."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, activation=nn.silu, bias: bool = False,
                 limit: Optional[float] = None):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden, intermediate, num_experts, bias)
        self.up_proj = SwitchLinear(hidden, intermediate, num_experts, bias)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts, bias)
        self.activation = activation
        self.limit = limit

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        def body(h, idx, s):
            g = self.gate_proj(h, idx, s)
            u = self.up_proj(h, idx, s)
            if self.limit is not None:
                g, u = mx.minimum(g, self.limit), mx.clip(u, -self.limit, self.limit)
            return self.down_proj(self.activation(g) * u, idx, s)

        return _run_experts(x, indices, body)


def relu2(x: mx.array) -> mx.array:
    """Squared ReLU (So et al. 2021, "Primer"): Nemotron-H's expert activation."""
    return mx.square(nn.relu(x))


class SwitchMLP(nn.Module):
    """Non-gated experts: ``down(act(up(x)))`` per chosen expert. ``names``: the
    (up, down) parameter names — ``("fc1", "fc2")`` for mlx-lm's Nemotron-H."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, activation=relu2, bias: bool = False,
                 names: tuple[str, str] = ("up_proj", "down_proj")):
        super().__init__()
        self._up, self._down = names
        setattr(self, self._up, SwitchLinear(hidden, intermediate, num_experts, bias))
        setattr(self, self._down, SwitchLinear(intermediate, hidden, num_experts, bias))
        self.activation = activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        up, down = getattr(self, self._up), getattr(self, self._down)

        def body(h, idx, s):
            return down(self.activation(up(h, idx, s)), idx, s)

        return _run_experts(x, indices, body)


def combine(y: mx.array, weights: mx.array) -> mx.array:
    """``Σ_k weights[..., k] · y[..., k, :]`` in the activations' dtype."""
    return (y * weights.astype(y.dtype)[..., None]).sum(axis=-2)


class MoEBlock(nn.Module):
    """Router + stacked experts (+ optional shared expert), with configurable names.

    ``router`` (default ``"gate"``): a bias-free ``Linear(H, E)`` whose output
    feeds :func:`route` with ``routing`` (a dict of its keyword arguments).
    ``experts`` (default ``"switch_mlp"``): a :class:`SwitchGLU` or
    :class:`SwitchMLP` (``gated``). ``correction_bias`` names an ``[E]`` float32
    parameter (``"expert_bias"``, ``"e_score_correction_bias"``) stored on the
    block; ``correction_bias_in_router=True`` stores it on the router module
    instead (``gate.e_score_correction_bias``). ``shared`` is any always-on
    module (an MLP) added to the routed output, scaled by
    ``σ(shared_expert_gate(x))`` when ``shared_gate`` names a ``Linear(H, 1)``.
    ``swiglu_limit``: the experts' clamped SwiGLU (:class:`SwitchGLU`).
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        routing: Optional[dict] = None,
        gated: bool = True,
        activation=None,
        expert_bias: bool = False,
        router: str = "gate",
        experts: str = "switch_mlp",
        correction_bias: Optional[str] = None,
        correction_bias_in_router: bool = False,
        shared: Optional[nn.Module] = None,
        shared_name: str = "shared_expert",
        shared_gate: Optional[str] = None,
        router_bias: bool = False,
        swiglu_limit: Optional[float] = None,
    ):
        super().__init__()
        self.top_k = top_k
        # Plain attributes, not module state (mlx would file dicts/tuples as parameters).
        object.__setattr__(self, "routing", dict(routing or {}))
        object.__setattr__(self, "_names", (router, experts, correction_bias, correction_bias_in_router, shared_name, shared_gate))
        setattr(self, router, nn.Linear(hidden, num_experts, bias=router_bias))
        cls = SwitchGLU if gated else SwitchMLP
        kwargs = {} if activation is None else {"activation": activation}
        if swiglu_limit is not None:
            kwargs["limit"] = swiglu_limit
        setattr(self, experts, cls(hidden, intermediate, num_experts, bias=expert_bias, **kwargs))
        if correction_bias:
            owner = getattr(self, router) if correction_bias_in_router else self
            setattr(owner, correction_bias, mx.zeros((num_experts,), dtype=mx.float32))
        if shared is not None:
            setattr(self, shared_name, shared)
            if shared_gate:
                setattr(self, shared_gate, nn.Linear(hidden, 1, bias=False))

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        router, _, cb, cb_in_router, _, _ = self._names
        bias = None
        if cb:
            owner = getattr(self, router) if cb_in_router else self
            bias = getattr(owner, cb)
        return route(getattr(self, router)(x), self.top_k, correction_bias=bias, **self.routing)

    def __call__(self, x: mx.array) -> mx.array:
        _, experts, _, _, shared_name, shared_gate = self._names
        inds, weights = self.route(x)
        y = combine(getattr(self, experts)(x, inds), weights)
        if shared_name in self:
            s = getattr(self, shared_name)(x)
            if shared_gate:
                s = mx.sigmoid(getattr(self, shared_gate)(x)) * s
            y = y + s
        return y
