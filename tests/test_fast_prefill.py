"""The prefill speed paths in models/common.py compute what they replace:
attention over query blocks (only the keys a block can see) equals one masked
attention over all keys, windows and caches included; the CPU tanh, soft-cap and
GELU stay within a few float32 roundings of the exact functions; the shifted-
product depthwise convolution equals conv_general; and a RecurrentGemma
prefill taken in query blocks of 4 still equals transformers' logits."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert
from hybridconv.models import common
from hybridconv.models.common import KVCache, WindowKVCache, attend, attention_mask, causal_depthwise_conv

from .conftest import assert_logits_close, random_ids, save_hf_recurrent_gemma, torch_logits


def _one_pass(q, k, v, offset, window, scale):
    """Reference: one masked attention over all keys (the path before blocks)."""
    mask = attention_mask(q.shape[2], k.shape[2], offset, window)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 13, 100])
@pytest.mark.parametrize("prefix", [0, 5, 11])
def test_blocked_attention_equals_one_pass(monkeypatch, window, prefix):
    monkeypatch.setattr(common, "ATTENTION_QUERY_BLOCK", 4)
    rng = np.random.default_rng(0)
    B, Hq, Hkv, d, T = 2, 4, 2, 8, 37
    q, k, v = (mx.array(rng.normal(size=(B, h, T, d)).astype(np.float32)) for h in (Hq, Hkv, Hkv))
    scale = d**-0.5
    if prefix == 0:
        got = attend(q, k, v, None, None, window, scale)
        ref = _one_pass(q, k, v, 0, window, scale)
    else:
        # prefix tokens cached first, then T - prefix new queries in blocks of 4
        cache = WindowKVCache(window) if window else KVCache()
        attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], None, cache, window, scale)
        got = attend(q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:], None, cache, window, scale)
        # all T keys; the mask drops those the window cache no longer holds
        ref = _one_pass(q[:, :, prefix:], k, v, prefix, window, scale)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=2e-6)


def test_blocked_attention_respects_the_window(monkeypatch):
    # a key just outside every query's window changes nothing; just inside, it does
    monkeypatch.setattr(common, "ATTENTION_QUERY_BLOCK", 4)
    rng = np.random.default_rng(1)
    T, d, window = 20, 8, 5
    q, k, v = (mx.array(rng.normal(size=(1, 1, T, d)).astype(np.float32)) for _ in range(3))
    base = np.array(attend(q, k, v, None, None, window, 1.0))
    v2 = np.array(v)
    v2[0, 0, 6] += 10.0  # seen by queries 6 .. 10 only
    out = np.array(attend(q, k, mx.array(v2), None, None, window, 1.0))
    changed = np.abs(out - base).max(axis=-1)[0] > 1e-3
    assert changed.tolist() == [6 <= t <= 10 for t in range(T)]


GRID = np.concatenate([np.linspace(-40, 40, 400_001), np.geomspace(1e-12, 1, 2001), -np.geomspace(1e-12, 1, 2001)])


@pytest.mark.skipif(not common.rational_tanh_pays(mx.zeros(1)), reason="mx.tanh is used here (GPU or no g++)")
def test_cpu_tanh_soft_cap_gelu_accuracy():
    x64 = GRID.astype(np.float32).astype(np.float64)
    x = mx.array(x64.astype(np.float32))

    def err(got, ref):
        return np.abs(np.array(got).astype(np.float64) - ref)

    assert err(common.tanh(x), np.tanh(x64)).max() < 5e-7
    assert (err(common.soft_cap(x * 10, 30.0), 30 * np.tanh(x64 * 10 / 30)) / 30).max() < 5e-7
    gelu = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert (err(common.gelu_tanh(x), gelu) / np.maximum(np.abs(x64), 1)).max() < 3e-7
    assert float(common.gelu_tanh(mx.array(-30.0))) == 0.0  # saturated: exactly 0, as mx.tanh gives
    special = mx.array([np.nan, np.inf, -np.inf, 0.0])
    np.testing.assert_allclose(np.array(common.tanh(special)), [np.nan, 1, -1, 0], rtol=0, atol=5e-7)
    assert np.array_equal(np.array(common.gelu_tanh(special)), [np.nan, np.inf, 0, 0], equal_nan=True)


def test_other_dtypes_keep_the_mlx_functions():
    x = mx.array(np.linspace(-6, 6, 101), dtype=mx.bfloat16)
    assert mx.array_equal(common.tanh(x), mx.tanh(x))
    assert mx.array_equal(common.soft_cap(x, 30.0), mx.tanh(x / 30.0) * 30.0)
    assert mx.array_equal(common.gelu_tanh(x), nn.gelu_approx(x))


@pytest.mark.parametrize("with_state", [False, True])
def test_shifted_depthwise_conv_equals_conv_general(with_state):
    rng = np.random.default_rng(2)
    C, K, T = 24, 4, 19
    x = mx.array(rng.normal(size=(2, T, C)).astype(np.float32))
    w = mx.array(rng.normal(size=(C, K, 1)).astype(np.float32))
    b = mx.array(rng.normal(size=(C,)).astype(np.float32))
    state = mx.array(rng.normal(size=(2, K - 1, C)).astype(np.float32)) if with_state else None
    y, new_state = causal_depthwise_conv(x, w, b, state)
    padded = mx.concatenate([state if with_state else mx.zeros((2, K - 1, C)), x], axis=1)
    ref = mx.conv_general(padded, w, groups=C) + b
    np.testing.assert_allclose(np.array(y), np.array(ref), rtol=1e-6, atol=1e-6)
    assert mx.array_equal(new_state, x[:, -(K - 1):])


def test_recurrent_gemma_prefill_in_blocks_equals_transformers(tmp_path, monkeypatch):
    # 40 tokens, window 8, query blocks of 4: blocks, window and cache all at work
    torch_model = save_hf_recurrent_gemma(tmp_path / "src", seed=3, num_hidden_layers=4,
                                          block_types=["recurrent", "attention"], attention_window_size=8)
    convert(str(tmp_path / "src"), tmp_path / "out", dtype="float32")
    model = hybridconv.load(tmp_path / "out")
    ids = random_ids(320, 40, batch=2, seed=5)
    ref = torch_logits(torch_model, ids)
    one_pass = np.array(model(mx.array(ids)))  # 40 <= 128 queries: one block
    monkeypatch.setattr(common, "ATTENTION_QUERY_BLOCK", 4)
    blocked = np.array(model(mx.array(ids)))
    assert np.abs(blocked - one_pass).max() <= 1e-5 * np.abs(one_pass).max()
    assert_logits_close(blocked, ref)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 17, 63, 200])
@pytest.mark.parametrize("carried", [False, True])
def test_blocked_linear_scan_equals_the_recurrence(T, carried):
    from hybridconv.models.recurrent_gemma import linear_scan

    rng = np.random.default_rng(T)
    a = rng.uniform(0.0, 1.0, size=(2, T, 6))
    a[:, :, 0] = 1.0 - 1e-4  # long memory in one channel
    x = rng.normal(size=(2, T, 6))
    h0 = rng.normal(size=(2, 6)) if carried else np.zeros((2, 6))
    ref, h = np.zeros_like(x), h0.copy()
    for t in range(T):  # the recurrence, sequentially in float64
        h = a[:, t] * h + x[:, t]
        ref[:, t] = h
    got = linear_scan(mx.array(a.astype(np.float32)), mx.array(x.astype(np.float32)),
                      mx.array(h0.astype(np.float32)) if carried else None)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("how", ["no g++", "kernels fail to build"])
def test_falls_back_to_mx_tanh_where_compiled_kernels_do_not_work(monkeypatch, how):
    if how == "no g++":
        monkeypatch.setattr(common.shutil, "which", lambda name: None)
    else:
        def broken(*_):
            raise RuntimeError("[compile] Failed to compile function")

        monkeypatch.setattr(common, "_tanh_out", broken)
    common._have_gxx.cache_clear()
    try:
        x = mx.array(np.linspace(-40, 40, 101, dtype=np.float32))
        assert not common.rational_tanh_pays(x)
        assert mx.array_equal(common.soft_cap(x, 30.0), mx.tanh(x / 30.0) * 30.0).item()
        assert mx.array_equal(common.gelu_tanh(x), nn.gelu_approx(x)).item()
    finally:
        monkeypatch.undo()
        common._have_gxx.cache_clear()
    assert common.rational_tanh_pays(mx.zeros(2)) == (common.shutil.which("g++") is not None)
