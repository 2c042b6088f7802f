"""The exponentially gated linear-attention core (models/linear_attention.py):
chunked prefill = the step-by-step recurrence = transformers' own pure-torch
kernels (xLSTM's mLSTM chunkwise and recurrent kernels, RWKV-4's WKV loop),
for several chunk sizes, ragged tails, carried states and RWKV's bonus."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.models.linear_attention import (
    NO_STATE,
    causal_log_decays,
    exp_gated,
    exp_gated_chunked,
    exp_gated_step,
    mlstm_readout,
    to_chunks,
)


def _mlstm_inputs(seed=0, b=2, T=37, H=3, dk=8, dv=5):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    q, k = (rng.normal(size=(b, H, T, dk)).astype(f32) for _ in range(2))
    v = rng.normal(size=(b, H, T, dv)).astype(f32)
    ig = (rng.normal(size=(b, H, T)) * 5).astype(f32)  # wide: exp(ĩ) needs the stabiliser
    fg = (rng.normal(size=(b, H, T)) * 3 + 2).astype(f32)
    return q, k, v, ig, fg


def _ours(q, k, v, ig, fg):
    """The transformers layout [b, H, T, ...] to the core's [b, T, H, ...], log f = logsigmoid."""
    tr = lambda a: mx.array(a).swapaxes(1, 2)  # noqa: E731
    fg = mx.array(fg)
    log_f = -mx.logaddexp(mx.zeros_like(fg), -fg)
    return tr(q), tr(k), tr(v), log_f.swapaxes(1, 2), tr(ig)


def _h(num, den, m, eps=1e-6):
    return np.array(mlstm_readout(num, den, m, eps).swapaxes(1, 2))


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    err = float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
    assert err <= tol, err


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_mlstm_chunked_equals_transformers_recurrence(chunk):
    import torch
    from transformers.models.xlstm import modeling_xlstm as X

    q, k, v, ig, fg = _mlstm_inputs()
    t = lambda a: torch.tensor(a)  # noqa: E731
    ref, (c, n, m) = X.mlstm_recurrent_sequence_native(t(q), t(k), t(v), t(ig), t(fg), return_last_states=True,
                                                       eps=1e-6)
    num, den, mm, (C, m_last) = exp_gated_chunked(*_ours(q, k, v, ig, fg), chunk_size=chunk)
    _close(_h(num, den, mm), ref.numpy(), 2e-5)
    # the carried state is transformers' (C, n, m): C' = [C | n]
    _close(np.array(C[..., :-1]), c.numpy(), 1e-5)
    _close(np.array(C[..., -1]), n.numpy(), 1e-5)
    np.testing.assert_allclose(np.array(m_last), m.numpy()[..., 0], atol=1e-5)


def test_mlstm_chunked_equals_transformers_chunkwise_kernel():
    """transformers' chunkwise form (3 chunks of 8, as the xlstm-tiny oracle runs)."""
    import torch
    from transformers.models.xlstm import modeling_xlstm as X

    q, k, v, ig, fg = (a[:, :, :24] for a in _mlstm_inputs(seed=1))
    t = lambda a: torch.tensor(a)  # noqa: E731
    ref = X.mlstm_chunkwise_native_autograd(t(q), t(k), t(v), t(ig), t(fg), chunk_size=8, eps=1e-6)
    for chunk in (8, 5, 64):
        _close(_h(*exp_gated_chunked(*_ours(q, k, v, ig, fg), chunk_size=chunk)[:3]), ref.numpy(), 2e-5)


def test_mlstm_step_and_carried_state():
    """Prefill of part of the sequence, then the rest chunked, then step by step:
    the same numerators, denominators and stabilisers as one pass (compared
    before the read-out, whose ``num / den`` amplifies rounding where random
    ``q·n`` nearly cancel)."""
    q, k, v, ig, fg = _ours(*_mlstm_inputs(seed=2, T=29))
    full = exp_gated_chunked(q, k, v, fg, ig, chunk_size=8)
    a = exp_gated_chunked(q[:, :11], k[:, :11], v[:, :11], fg[:, :11], ig[:, :11], chunk_size=8)
    b = exp_gated_chunked(q[:, 11:20], k[:, 11:20], v[:, 11:20], fg[:, 11:20], ig[:, 11:20], a[3], chunk_size=4)
    parts, state = [a[:3], b[:3]], b[3]
    for t in range(20, 29):
        s = slice(t, t + 1)
        *out, state = exp_gated(q[:, s], k[:, s], v[:, s], fg[:, s], ig[:, s], state)
        parts.append(out)
    step = exp_gated_step(q, k, v, fg, ig)
    for i in range(3):  # num, den, m
        pieced = np.concatenate([np.array(p[i]) for p in parts], axis=1)
        _close(pieced, np.array(full[i]), 1e-5)
        _close(np.array(step[i]), np.array(full[i]), 1e-5)
    _close(np.array(state[0]), np.array(full[3][0]), 1e-5)


def _wkv_inputs(seed=0, b=2, T=41, A=6):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    time_decay = (rng.normal(size=A) * 2).astype(f32)
    time_decay[0] = 6.0  # w = e^6 ≈ 400: a channel that forgets at once
    time_first = rng.normal(size=A).astype(f32)
    key = (rng.normal(size=(b, T, A)) * 8).astype(f32)  # e^k far outside float32 without the stabiliser
    key[:, :, 1] += 60.0
    value = rng.normal(size=(b, T, A)).astype(f32)
    return time_decay, time_first, key, value


def _wkv(time_decay, time_first, key, value, state=None, chunk=16, step=False):
    w = mx.exp(mx.array(time_decay))
    log_f = mx.broadcast_to(-w, key.shape)
    fn = exp_gated_step if step else exp_gated_chunked
    kw = {} if step else {"chunk_size": chunk}
    num, den, _, state = fn(None, None, mx.array(value)[..., None], log_f, mx.array(key), state,
                            bonus=mx.array(time_first), m0=NO_STATE, **kw)
    return np.array(num[..., 0] / den), state


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_wkv_chunked_equals_transformers(chunk):
    import torch
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, key, value = _wkv_inputs()
    t = lambda a: torch.tensor(a)  # noqa: E731
    ref, (num, den, mx_) = rwkv_linear_attention_cpu(t(td), t(tf), t(key), t(value), return_state=True)
    got, (C, m) = _wkv(td, tf, key, value, chunk=chunk)
    _close(got, ref.numpy(), 1e-5)
    # the state is transformers' (num, den, max), same stabilisation
    np.testing.assert_allclose(np.array(m), mx_.numpy(), atol=1e-4)
    _close(np.array(C[:, :, 0, 0]), num.numpy(), 1e-5)
    _close(np.array(C[:, :, 0, 1]), den.numpy(), 1e-5)


def test_wkv_step_and_carried_state():
    import torch
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, key, value = _wkv_inputs(seed=3, T=30)
    t = lambda a: torch.tensor(a)  # noqa: E731
    ref, _ = rwkv_linear_attention_cpu(t(td), t(tf), t(key), t(value))
    a, state = _wkv(td, tf, key[:, :13], value[:, :13], chunk=8)
    parts = [a]
    for i in range(13, 30):
        out, state = _wkv(td, tf, key[:, i:i + 1], value[:, i:i + 1], state, step=True)
        parts.append(out)
    _close(np.concatenate(parts, axis=1), ref.numpy(), 1e-5)
    _close(_wkv(td, tf, key, value, step=True)[0], ref.numpy(), 1e-5)


def test_shared_chunking_helpers():
    x = mx.arange(2 * 5 * 3).reshape(2, 5, 3).astype(mx.float32)
    c = to_chunks(x, 2, fill=-1.0)
    assert c.shape == (2, 3, 3, 2)
    assert np.array_equal(np.array(c[0, 1, 0]), [1.0, 4.0])
    assert np.array_equal(np.array(c[1, 2, 2]), [29.0, -1.0])  # the padded tail
    G = mx.array([[0.0, -1.0, -3.0]])
    d = np.array(causal_log_decays(G))
    assert d[0, 2, 0] == -3.0 and d[0, 1, 1] == 0.0 and d[0, 0, 1] == -np.inf
    s = np.array(causal_log_decays(G, G + 1.0, strict=True))
    assert s[0, 1, 1] == -np.inf and s[0, 2, 1] == -1.0


@pytest.mark.parametrize("elements", [1, 300])
def test_groups_of_chunks(monkeypatch, elements):
    """Long prompts are formed a group of chunks at a time (GROUP_ELEMENTS): the
    same results with one chunk per group and with a few."""
    import hybridconv.models.linear_attention as la

    q, k, v, ig, fg = _ours(*_mlstm_inputs(seed=4, T=45))
    whole = exp_gated_chunked(q, k, v, fg, ig, chunk_size=4)
    td, tf, key, value = _wkv_inputs(seed=5, T=45)
    wkv_whole, _ = _wkv(td, tf, key, value, chunk=4)
    monkeypatch.setattr(la, "GROUP_ELEMENTS", elements)
    grouped = exp_gated_chunked(q, k, v, fg, ig, chunk_size=4)
    for a, b in zip(grouped[:3], whole[:3]):
        _close(np.array(a), np.array(b), 1e-6)
    _close(_wkv(td, tf, key, value, chunk=4)[0], wkv_whole, 1e-6)
