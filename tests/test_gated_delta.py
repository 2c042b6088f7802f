"""The shared gated delta-rule core against transformers' PyTorch references.

chunked (WY/UT form) = step-by-step recurrence = transformers'
``torch_recurrent_gated_delta_rule`` (per-head decay, Qwen3-Next) and
``recurrent_kimi_delta_attention`` (per-channel decay, KDA), on random inputs
with an initial state, sequences spanning several chunks and not a multiple of
the chunk size, grouped value heads, strong decays and β up to 2.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from hybridconv.models.gated_delta import (
    gated_delta,
    gated_delta_chunked,
    gated_delta_step,
    l2norm,
    unit_lower_inverse,
)

tq = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
tk = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")

TOL = 2e-5


def _inputs(seed, b, T, hk, h, dk, dv, per_channel, decay_scale=0.5, beta_max=1.0):
    rng = np.random.default_rng(seed)
    f = np.float32
    q = rng.standard_normal((b, T, hk, dk)).astype(f)
    k = rng.standard_normal((b, T, hk, dk)).astype(f)
    v = rng.standard_normal((b, T, h, dv)).astype(f)
    g_shape = (b, T, h, dk) if per_channel else (b, T, h)
    g = (-np.abs(rng.standard_normal(g_shape)) * decay_scale).astype(f)
    beta = (beta_max / (1 + np.exp(-rng.standard_normal((b, T, h))))).astype(f)
    s0 = rng.standard_normal((b, h, dk, dv)).astype(f)
    return q, k, v, g, beta, s0


def _reference(q, k, v, g, beta, s0, per_channel):
    t = torch.from_numpy
    if per_channel:
        o, s = tk.recurrent_kimi_delta_attention(
            t(q), t(k), t(v), t(g), t(beta), t(s0), True, use_qk_l2norm_in_kernel=True
        )
    else:
        o, s = tq.torch_recurrent_gated_delta_rule(
            t(q), t(k), t(v), t(g), t(beta), t(s0), True, use_qk_l2norm_in_kernel=True
        )
    return o.numpy(), s.numpy()


def _ours(fn, q, k, v, g, beta, s0, **kw):
    o, s = fn(l2norm(mx.array(q)), l2norm(mx.array(k)), mx.array(v), mx.array(g), mx.array(beta), mx.array(s0), **kw)
    return np.array(o), np.array(s)


def _close(a, b, tol=TOL):
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


@pytest.mark.parametrize(
    "per_channel,T,chunk,hk,h",
    [
        (False, 150, 32, 2, 4),  # grouped value heads (Qwen3-Next), 5 chunks, ragged tail
        (False, 64, 64, 2, 2),  # exactly one chunk
        (False, 7, 64, 1, 2),  # shorter than a chunk
        (True, 100, 16, 3, 3),  # KDA: per-channel decay, 7 chunks, ragged tail
    ],
)
def test_chunked_equals_recurrence_and_transformers(per_channel, T, chunk, hk, h):
    args = _inputs(T + h, 2, T, hk, h, 16, 8, per_channel)
    ref_o, ref_s = _reference(*args, per_channel)
    o, s = _ours(gated_delta_chunked, *args, chunk_size=chunk)
    so, ss = _ours(gated_delta_step, *args)
    _close(o, ref_o)
    _close(s, ref_s)
    _close(so, ref_o)
    _close(ss, ref_s)


def test_matches_transformers_chunked_kernels():
    """Also the chunked references (transformers' own WY implementations)."""
    t = torch.from_numpy
    args = _inputs(1, 1, 90, 2, 2, 16, 8, False)
    q, k, v, g, beta, s0 = args
    ref_o, ref_s = tq.torch_chunk_gated_delta_rule(
        t(q), t(k), t(v), t(g), t(beta), chunk_size=32, initial_state=t(s0),
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    o, s = _ours(gated_delta_chunked, *args, chunk_size=32)
    _close(o, ref_o.numpy())
    _close(s, ref_s.numpy())
    args = _inputs(2, 1, 90, 2, 2, 16, 8, True)
    q, k, v, g, beta, s0 = args
    ref_o, ref_s = tk.chunk_kimi_delta_attention(
        t(q), t(k), t(v), t(g), t(beta), chunk_size=32, initial_state=t(s0),
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    o, s = _ours(gated_delta_chunked, *args, chunk_size=32)
    _close(o, ref_o.numpy())
    _close(s, ref_s.numpy())


@pytest.mark.parametrize("per_channel", [False, True])
def test_strong_decay_and_negative_eigenvalues(per_channel):
    """Decays of up to ~exp(-8) per step (cumulated log-decay far below float32's
    exp range over a chunk) and β ∈ (0, 2) (OLMo-Hybrid): no overflow, same
    result as the recurrence."""
    args = _inputs(3, 1, 80, 2, 2, 8, 8, per_channel, decay_scale=4.0, beta_max=2.0)
    ref_o, ref_s = _reference(*args, per_channel)
    o, s = _ours(gated_delta_chunked, *args, chunk_size=64)
    assert np.isfinite(o).all() and np.isfinite(s).all()
    _close(o, ref_o)
    _close(s, ref_s)


def test_split_prefill_and_decode_continue_the_state():
    """Prefill in two pieces, then decode steps through `gated_delta`: the same
    outputs as one chunked pass over the whole sequence."""
    q, k, v, g, beta, s0 = _inputs(4, 1, 75, 2, 4, 16, 8, False)
    full_o, full_s = _ours(gated_delta_chunked, q, k, v, g, beta, s0, chunk_size=16)
    pieces, s = [], s0
    for a, z in [(0, 37), (37, 70)] + [(t, t + 1) for t in range(70, 75)]:
        o, s = _ours(gated_delta, q[:, a:z], k[:, a:z], v[:, a:z], g[:, a:z], beta[:, a:z], s, chunk_size=16)
        pieces.append(o)
    _close(np.concatenate(pieces, axis=1), full_o)
    _close(s, full_s)


def test_zero_initial_state_and_scale():
    q, k, v, g, beta, _ = _inputs(5, 1, 20, 1, 1, 8, 4, False)
    o_none, _ = gated_delta_chunked(mx.array(q), mx.array(k), mx.array(v), mx.array(g), mx.array(beta), None)
    o_zero, _ = gated_delta_chunked(
        mx.array(q), mx.array(k), mx.array(v), mx.array(g), mx.array(beta), mx.zeros((1, 1, 8, 4))
    )
    o_scaled, _ = gated_delta_chunked(
        mx.array(q), mx.array(k), mx.array(v), mx.array(g), mx.array(beta), None, scale=1.0
    )
    np.testing.assert_array_equal(np.array(o_none), np.array(o_zero))
    _close(np.array(o_scaled) * 8**-0.5, np.array(o_none))


def test_unit_lower_inverse():
    rng = np.random.default_rng(6)
    m = rng.standard_normal((3, 32, 32)).astype(np.float32)
    inv = np.array(unit_lower_inverse(mx.array(m)))
    ref = np.linalg.inv(np.tril(m.astype(np.float64), -1) + np.eye(32))
    assert np.abs(inv - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(ValueError, match="power of two"):
        unit_lower_inverse(mx.zeros((12, 12)))


@pytest.mark.parametrize("sub", [4, 16, 64])
def test_per_channel_sub_blocks_equal_direct_form(sub):
    """The sub-blocked per-channel decay products equal the direct [C, C, Dk]
    form, also with decays strong enough that exp(-G) would overflow."""
    from hybridconv.models.gated_delta import _decayed_products

    rng = np.random.default_rng(7)
    C, D = 64, 8
    x, k = (mx.array(rng.standard_normal((2, 3, C, D)).astype(np.float32)) for _ in range(2))
    G = mx.cumsum(mx.array(-np.abs(rng.standard_normal((2, 3, C, D))).astype(np.float32) * 6.0), axis=-2)
    (got,) = _decayed_products((x,), k, G, sub)
    Gn, xn, kn = (np.array(t, dtype=np.float64) for t in (G, x, k))
    diff = Gn[..., :, None, :] - Gn[..., None, :, :]
    mask = np.tril(np.ones((C, C), bool))[..., None]
    ref = (xn[..., :, None, :] * kn[..., None, :, :] * np.exp(np.where(mask, diff, -np.inf))).sum(-1)
    assert np.isfinite(np.array(got)).all()
    assert np.abs(np.array(got) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_intra_chunk_groups(monkeypatch):
    """Intra-chunk terms formed a few chunks at a time give the same result."""
    import hybridconv.models.gated_delta as gd

    args = _inputs(8, 1, 150, 2, 4, 16, 8, False)
    ref_o, ref_s = _ours(gated_delta_chunked, *args, chunk_size=16)
    monkeypatch.setattr(gd, "INTRA_GROUP", 3)  # 10 chunks in groups of 3, 3, 3, 1
    o, s = _ours(gated_delta_chunked, *args, chunk_size=16)
    _close(o, ref_o, 1e-6)
    _close(s, ref_s, 1e-6)
