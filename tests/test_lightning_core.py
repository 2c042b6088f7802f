"""The gated linear recurrence (no delta rule) on the shared chunked core —
lightning attention's math — against a step-by-step float64 recurrence and
against transformers' own MiniMax lightning-attention block computation:
per-head and per-channel decays, an initial state, grouped heads, chunk sizes
that are not powers of two, sequences of several chunks with a ragged tail,
and a prefill continued one step at a time."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.models.gated_delta import gated_linear_attention, gated_linear_attention_chunked, gated_linear_attention_step

TOL = 2e-5


def _inputs(seed, b, T, hk, h, dk, dv, per_channel, decay_scale=0.5):
    rng = np.random.default_rng(seed)
    f = np.float32
    q = rng.standard_normal((b, T, hk, dk)).astype(f) * 0.3
    k = rng.standard_normal((b, T, hk, dk)).astype(f) * 0.3
    v = rng.standard_normal((b, T, h, dv)).astype(f)
    g = (-np.abs(rng.standard_normal((b, T, h, dk) if per_channel else (b, T, h))) * decay_scale).astype(f)
    s0 = rng.standard_normal((b, h, dk, dv)).astype(f)
    return q, k, v, g, s0


def _reference(q, k, v, g, s0, scale):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ (scale·q_t)``, float64, step by step."""
    q, k, v, g, S = (x.astype(np.float64) for x in (q, k, v, g, s0))
    h, hk = v.shape[2], q.shape[2]
    q, k = np.repeat(q, h // hk, axis=2), np.repeat(k, h // hk, axis=2)
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        decay = np.exp(g[:, t])
        S = S * (decay[..., None] if g.ndim == 4 else decay[..., None, None])
        S = S + k[:, t][..., None] * v[:, t][..., None, :]
        out[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t] * scale)
    return out, S


def _close(a, b, tol=TOL):
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(np.asarray(a) - b).max() <= tol * scale, np.abs(np.asarray(a) - b).max()


@pytest.mark.parametrize(
    "per_channel,T,chunk,hk,h,scale",
    [
        (False, 150, 64, 2, 4, None),  # grouped heads, 3 chunks, ragged tail, default Dk^-1/2
        (False, 100, 24, 3, 3, 1.0),  # chunk not a power of two, no scale (lightning attention)
        (False, 5, 64, 1, 2, 1.0),  # shorter than a chunk
        (True, 70, 16, 2, 2, None),  # per-channel decay (GLA), 5 chunks
    ],
)
def test_chunked_and_step_equal_the_recurrence(per_channel, T, chunk, hk, h, scale):
    q, k, v, g, s0 = _inputs(T + chunk, 2, T, hk, h, 16, 8, per_channel)
    ref_o, ref_s = _reference(q, k, v, g, s0, 16**-0.5 if scale is None else scale)
    args = [mx.array(x) for x in (q, k, v, g)]
    o, s = gated_linear_attention_chunked(*args, mx.array(s0), chunk, scale=scale)
    _close(o, ref_o)
    _close(s, ref_s)
    so, ss = gated_linear_attention_step(*args, mx.array(s0), scale=scale)
    _close(so, ref_o)
    _close(ss, ref_s)
    # no initial state = zeros
    o0, _ = gated_linear_attention_chunked(*args, None, chunk, scale=scale)
    _close(o0, _reference(q, k, v, g, np.zeros_like(s0), 16**-0.5 if scale is None else scale)[0])


def test_prefill_then_steps_continue_the_state():
    q, k, v, g, s0 = _inputs(3, 1, 90, 2, 2, 8, 8, False)
    full, _ = gated_linear_attention(*(mx.array(x) for x in (q, k, v, g)), None, 32, scale=1.0)
    o, S = gated_linear_attention(*(mx.array(x[:, :70]) for x in (q, k, v, g)), None, 32, scale=1.0)
    outs = [o]
    for t in range(70, 90):
        o, S = gated_linear_attention(*(mx.array(x[:, t : t + 1]) for x in (q, k, v, g)), S, 32, scale=1.0)
        outs.append(o)
    _close(mx.concatenate(outs, axis=1), np.array(full))


def test_matches_transformers_lightning_blocks():
    """transformers' MiniMaxLightningAttention forward (blocks of 8 with its
    stored slope / decay buffers, 3 blocks and a partial one) = the chunked
    core with ``g = -slope``, ``scale = 1`` and chunks of 64, on the same
    q/k/v."""
    import torch
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=3, block_size=8,
                        layer_types=["linear_attention"] * 3)
    layer = MiniMaxLightningAttention(cfg, layer_idx=1).eval()
    # Capture q/k/v and the core's output: identity projections around the block loop.
    T, H, D = 29, 4, 8
    rng = np.random.default_rng(0)
    qkv = torch.from_numpy(rng.standard_normal((1, T, H, 3 * D)).astype(np.float32) * 0.5)
    captured = {}

    class Fn(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    layer.act_fn = Fn(lambda x: x)
    layer.qkv_proj = Fn(lambda x: qkv.reshape(1, T, -1))
    layer.norm = Fn(lambda x: x)
    layer.output_gate = Fn(lambda x: torch.full((1, T, H * D), 1e4))  # sigmoid = 1
    layer.out_proj = Fn(lambda x: captured.setdefault("o", x))
    with torch.no_grad():
        layer(torch.zeros(1, T, 32), None, None)
    ref = captured["o"].numpy().reshape(1, T, H, D)
    q, k, v = np.split(qkv.numpy(), 3, axis=-1)
    slope = layer.slope_rate.numpy().reshape(H)
    g = np.broadcast_to(-slope, (1, T, H)).astype(np.float32)
    o, _ = gated_linear_attention(*(mx.array(x) for x in (q, k, v, g)), None, 64, scale=1.0)
    _close(o, ref)
