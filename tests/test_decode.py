"""Incremental decoding through the caches gives the logits of one full prefill
(float32), including sequences longer than the attention window, and both equal
an outside reference: transformers' RecurrentGemma, and the independent PyTorch
PLaMo-2 (verify/torch_plamo2.py, itself checked against the authors' port on
fixtures/hybrids/plamo2-window-tiny). Self-consistency alone cannot catch a
mistake prefill and decode share (a window one position too wide, say)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert

from .conftest import (
    assert_logits_close,
    decode_logits,
    plamo2_config,
    save_hf_plamo2,
    save_hf_recurrent_gemma,
    tolerance,
    torch_logits,
)


def _check_decode(model, ids: mx.array, prefix: int, chunk: int = 1):
    full = np.array(model(ids))
    cache = model.make_cache()
    parts = [np.array(model(ids[:, :prefix], cache=cache))]
    for start in range(prefix, ids.shape[1], chunk):
        parts.append(np.array(model(ids[:, start : start + chunk], cache=cache)))
    stepped = np.concatenate(parts, axis=1)
    assert stepped.shape == full.shape
    diff = np.abs(stepped - full).max()
    assert diff <= tolerance(full), f"decode differs from prefill by {diff}"


@pytest.fixture(scope="module")
def rg_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("rg")
    torch_model = save_hf_recurrent_gemma(root / "src", seed=7, num_hidden_layers=4,
                                          block_types=["recurrent", "attention"], attention_window_size=8)
    convert(str(root / "src"), root / "out", dtype="float32")
    return hybridconv.load(root / "out"), torch_model


@pytest.fixture(scope="module")
def rg_model(rg_case):
    return rg_case[0]


@pytest.fixture(scope="module")
def plamo_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("plamo")
    # layer 1 windowed (8), layer 3 full attention; SSD chunks of 8
    cfg = plamo2_config(attention_window_size=8, full_attention_idx=[3], mamba_chunk_size=8)
    save_hf_plamo2(root / "src", cfg, seed=9)
    convert(str(root / "src"), root / "out", dtype="float32")
    return hybridconv.load(root / "out"), root / "src"


@pytest.fixture(scope="module")
def plamo_model(plamo_case):
    return plamo_case[0]


@pytest.mark.parametrize("prefill", [1, 12])
def test_recurrent_gemma_decode_equals_transformers(rg_case, prefill):
    """30 tokens through a window of 8: transformers' logits, by prefill + decode."""
    model, torch_model = rg_case
    ids = np.array(IDS)
    ref = torch_logits(torch_model, ids)
    assert_logits_close(np.array(model(IDS)), ref)
    assert_logits_close(decode_logits(model, ids, prefill), ref)


@pytest.mark.parametrize("prefill", [1, 12])
def test_plamo2_decode_equals_torch_reference(plamo_case, prefill):
    import torch

    from hybridconv.verify.torch_plamo2 import TorchPlamo2

    model, src = plamo_case
    ids = np.array(IDS)
    ref = TorchPlamo2(src)(torch.tensor(ids, dtype=torch.long)).numpy()
    assert_logits_close(np.array(model(IDS)), ref)
    assert_logits_close(decode_logits(model, ids, prefill), ref)


IDS = mx.array(np.random.default_rng(4).integers(3, 320, size=(2, 30)).astype(np.int32))


@pytest.mark.parametrize("prefix,chunk", [(1, 1), (5, 1), (12, 1), (3, 4), (10, 7)])
def test_recurrent_gemma_decode_equals_prefill(rg_model, prefix, chunk):
    _check_decode(rg_model, IDS, prefix, chunk)


@pytest.mark.parametrize("prefix,chunk", [(1, 1), (5, 1), (12, 1), (3, 4), (10, 7)])
def test_plamo2_decode_equals_prefill(plamo_model, prefix, chunk):
    _check_decode(plamo_model, IDS, prefix, chunk)


def test_plamo2_cache_kinds(plamo_model):
    """The caches are mlx-lm's own classes (its prompt-cache files rebuild them by
    class name): SSM state, the window's ring of W + 1 positions, full keys."""
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

    caches = plamo_model.make_cache()
    assert [type(c) for c in caches] == [ArraysCache, RotatingKVCache, ArraysCache, KVCache]
    assert caches[1].max_size == 9 and caches[1].keep == 0  # window 8: the query and 8 before it


def test_window_matters(rg_model):
    # the window really restricts attention: a token outside it changes nothing
    # in attention layers only through the recurrence, so compare with window off
    ids = IDS[:, :20]
    base = np.array(rg_model(ids))
    for layer in rg_model.layers:
        if layer.kind == "attention":
            layer.temporal_block.window = None
    try:
        assert np.abs(np.array(rg_model(ids)) - base).max() > 1e-4
    finally:
        for layer in rg_model.layers:
            if layer.kind == "attention":
                layer.temporal_block.window = 8
