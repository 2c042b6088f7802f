"""PLaMo-2 as its authors wrote it (issue 14): no clip of the time step, and a
windowed attention layer attends to itself and the ``W`` positions before it.

Oracle: ``fixtures/hybrids/plamo2-window-tiny`` (Preferred Networks' own MLX
port; window 8, 40 tokens, two SSM heads with time steps near 1e-4). The
PyTorch reference (verify/torch_plamo2.py) is checked against it, and then
serves as the oracle for unseen configurations built here."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import compute_reference
from hybridconv.verify.run import verify_folder

from .conftest import (
    assert_logits_close,
    decode_logits,
    hybrid_case,
    oracle_logits,
    plamo2_config,
    random_ids,
    save_hf_plamo2,
    tolerance,
)

CASE = "plamo2-window-tiny"


@pytest.fixture(scope="module")
def window_case(tmp_path_factory):
    case = hybrid_case(CASE)
    out = tmp_path_factory.mktemp("plamo2-window") / "out"
    convert(str(case), out, dtype="float32")
    return case, out


def test_fixture_exercises_both_differences(window_case):
    case, _ = window_case
    cfg = json.loads((case / "config.json").read_text())
    ids, _ = oracle_logits(case)
    assert ids.shape[1] >= 5 * cfg["attention_window_size"]


def test_window_fixture_through_hybridconv_load(window_case):
    case, out = window_case
    ids, ref = oracle_logits(case)
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), ref)


def test_window_fixture_prefill_equals_cached_decode(window_case):
    case, out = window_case
    ids, ref = oracle_logits(case)
    model = hybridconv.load(out)
    for prefill in (1, 9, 20):  # decode runs through the window cache, 5x the window
        assert_logits_close(decode_logits(model, ids, prefill), ref)


def test_window_cache_keeps_w_past_positions(window_case):
    _, out = window_case
    model = hybridconv.load(out)
    cache = model.make_cache()
    model(mx.array(np.arange(3, 23, dtype=np.int32)[None]), cache=cache)
    model(mx.array([[5]], dtype=mx.int32), cache=cache)
    windowed = [c for layer, c in zip(model.layers, cache) if not layer.is_mamba and layer.mixer.window]
    # mlx-lm's RotatingKVCache of W + 1 slots: the W = 8 past positions and the new one
    assert windowed and all(c.keys.shape[2] == 9 and c.size() == 9 for c in windowed)


def test_torch_reference_matches_window_fixture():
    import torch

    from hybridconv.verify.torch_plamo2 import TorchPlamo2

    case = hybrid_case(CASE)
    ids, ref = oracle_logits(case)
    got = TorchPlamo2(case)(torch.tensor(ids)).numpy()
    assert_logits_close(got, ref)


def test_window_fixture_through_verify(window_case):
    case, out = window_case
    src = resolve(str(case))
    cfg = json.loads((case / "config.json").read_text())
    inputs = build_inputs(src.path, cfg["vocab_size"], random_tokens=40, num_sequences=2, seed=1)
    ref = compute_reference(src, inputs)
    report = verify_folder(out, ref).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    o = report["metrics"]["overall"]
    assert o["kl_mean"] < 1e-8 and o["top1_agreement"] == 1.0


def test_mlx_lm_differs_on_window_fixture(window_case):
    """mlx-lm clips dt to [1e-3, 100] and applies no window: it opens the
    output but computes another model (measured max |Δlogit| 10.3)."""
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    case, out = window_case
    ids, ref = oracle_logits(case)
    model, _ = load_model(out)
    diff = float(np.abs(np.array(model(mx.array(ids))) - ref).max())
    assert diff > 1.0


def _negative_dt_bias(folder, value: float, seed: int):
    """Set every dt_bias to about ``value``: softplus gives time steps near
    exp(value), far below mlx-lm's 1e-3 floor."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    rng = np.random.default_rng(seed)
    for name in tensors:
        if name.endswith("dt_bias"):
            tensors[name] = (value + 0.3 * rng.normal(size=tensors[name].shape)).astype(np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})


UNSEEN = {
    # window 3, every attention layer windowed, sequence 10x the window
    "w3-all-windowed": dict(attention_window_size=3, mamba_chunk_size=8),
    # window 4; layer 1 windowed, layer 3 full
    "w4-mixed": dict(attention_window_size=4, full_attention_idx=[3], mamba_chunk_size=16),
    # mamba_step 3 over 6 layers: attention at 1 and 4, 4 full; window 5
    "w5-step3": dict(attention_window_size=5, num_hidden_layers=6, mamba_step=3, full_attention_idx=[4],
                     mamba_chunk_size=8),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_plamo2_unseen_against_torch_reference(name, tmp_path):
    import torch

    from hybridconv.verify.torch_plamo2 import TorchPlamo2

    over = UNSEEN[name]
    cfg = plamo2_config(**over)
    src = tmp_path / "src"
    save_hf_plamo2(src, cfg, seed=len(name))
    _negative_dt_bias(src, -9.0, seed=len(name))
    window = over["attention_window_size"]
    ids = random_ids(cfg["vocab_size"], max(30, 5 * window), batch=2, seed=3)
    ref = TorchPlamo2(src)(torch.tensor(ids)).numpy()
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    got = np.array(model(mx.array(ids)))
    assert_logits_close(got, ref)
    # prefill = cached decode, well past the window
    stepped = decode_logits(model, ids, prefill=window - 1)
    assert np.abs(stepped - got).max() <= tolerance(got)
    # the strongly negative dt_bias is where a clip at 1e-3 would change the model
    mixer = next(layer.mixer for layer in model.layers if layer.is_mamba)
    assert float(mx.max(mx.log1p(mx.exp(mixer.dt_bias)))) < 1e-3
