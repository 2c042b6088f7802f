"""xLSTM (mLSTM blocks): the oracle case (3 chunks of 8), unseen configurations
built with transformers (the fused weight layout, biases, other head and FFN
widths, other gate and logit caps, chunk sizes and sequences that are not a
multiple of them, the published NX-AI config layout), prefill = cached decode
across chunk boundaries, bf16 / 4-bit verify. mlx-lm has no xLSTM (checked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridconv.converters.xlstm import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_matches,
    oracle_case,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import hybrid_case, random_ids

CASE = "wave3/xlstm-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_layout_and_decode(oracle, tmp_path):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == ["mlstm", "mlstm"]
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_tensor("backbone.layers.0.mlstm_layer.fgate_preact.bias").dtype.name == "float32"
    assert "backbone.layers.1.mlstm_layer.igate_preact.bias" in names
    assert not any(".blocks." in n for n in names)
    # prefill 5 tokens, then 19 one-token steps across the chunk boundaries at 8 and 16
    prefill_equals_decode(model, ids, prefill=5)
    prefill_equals_decode(model, ids, prefill=17)
    assert_reconvert_is_noop(out, tmp_path)


def test_mlx_lm_has_no_xlstm():
    import importlib.util

    assert importlib.util.find_spec("mlx_lm") is not None
    assert importlib.util.find_spec("mlx_lm.models.xlstm") is None


def _config(**over):
    from transformers import xLSTMConfig

    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=8,
              ffn_proj_factor=2.0, ffn_round_up_to_multiple_of=32, autocast_kernel_dtype="float32")
    kw.update(over)
    return xLSTMConfig(**kw)


def _published(cfg: dict) -> dict:
    """As NX-AI/xLSTM-7b states it (the xlstm package's xLSTMLargeConfig)."""
    cfg = dict(cfg)
    cfg.pop("hidden_size")
    cfg.pop("num_hidden_layers")
    cfg.update(chunkwise_kernel="chunkwise--triton_xl_chunk", sequence_kernel="native_sequence__triton",
               step_kernel="triton", head_dim=cfg["embedding_dim"] // cfg["num_heads"], add_post_blocks_norm=True,
               transformers_version="4.47.0.dev0")
    return cfg


def _fuse(src):
    """Rewrite a single-layout checkpoint into the fused one (``weight_mode:
    fused``: ``qkv_opreact``, ``ifgate_preact``, ``proj_up_gate_z``), the same
    function. (transformers 5.24 cannot build a fused xLSTM itself: its weight
    init fails on the fused gate bias.)"""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    fused = {
        "mlstm_layer.qkv_opreact": ["mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"],
        "mlstm_layer.ifgate_preact": ["mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"],
        "ffn.proj_up_gate_z": ["ffn.proj_up_gate", "ffn.proj_up"],
    }
    for layer in {n.split(".")[2] for n in t if n.startswith("backbone.blocks.")}:
        pre = f"backbone.blocks.{layer}."
        for target, parts in fused.items():
            for kind in ("weight", "bias"):
                names = [f"{pre}{p}.{kind}" for p in parts]
                if all(n in t for n in names):
                    t[f"{pre}{target}.{kind}"] = np.concatenate([t.pop(n) for n in names], axis=0)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, weight_mode="fused"), indent=2))


UNSEEN = {
    # fused layout with biases, narrower q/k and v, 2 heads, chunks of 4 (21 tokens: a ragged tail)
    "fused-bias": dict(use_bias=True, num_heads=2, qk_dim_factor=0.25, v_dim_factor=0.5, chunk_size=4),
    # three blocks, other caps and FFN rounding, chunks of 16 (no full chunk ends inside 21 tokens but one)
    "caps-wide-ffn": dict(num_hidden_layers=3, gate_soft_cap=5.0, output_logit_soft_cap=2.0, ffn_proj_factor=2.667,
                          ffn_round_up_to_multiple_of=64, chunk_size=16),
    # published layout (embedding_dim / num_blocks, Triton kernel names)
    "published": dict(num_heads=8, chunk_size=8),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import xLSTMForCausalLM

    ids = random_ids(256, 21, batch=2, seed=4)
    rewrite = _published if name == "published" else None
    src, ref = transformers_case(tmp_path, _config(**UNSEEN[name]), xLSTMForCausalLM, ids, seed=5, rewrite=rewrite)
    if name == "fused-bias":
        _fuse(src)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    if name == "published":
        # verify's reference reads the published config (Triton kernel names that
        # transformers' strict config refuses) through the native kernels
        from hybridconv.checkpoint import resolve
        from hybridconv.verify.inputs import Inputs
        from hybridconv.verify.reference import compute_reference

        got = compute_reference(resolve(str(src)), Inputs(sequences=[ids[0]], description="test"), keep_hidden=False)
        np.testing.assert_allclose(np.asarray(got.outputs[0]["logits"]), ref[0], atol=1e-5)
    if name == "fused-bias":
        prefill_equals_decode(model, ids, prefill=6)
        assert_reconvert_is_noop(tmp_path / "out", tmp_path)


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert [b["kind"] for b in reports["bf16"]["blocks"]] == ["mlstm", "mlstm"]
    print({k: r["metrics"]["overall"]["kl_mean"] for k, r in reports.items()})


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"add_out_norm": False}, "add_out_norm"),
        ({"num_heads": 3}, "multiple of num_heads"),
        ({"weight_mode": "stacked"}, "weight_mode"),
        ({"embedding_dim": 32}, "embedding_dim"),
        ({"gate_soft_cap": -1.0}, "gate_soft_cap"),
        ({"hidden_size": None, "embedding_dim": None}, "hidden_size"),
    ],
)
def test_bad_configs(change, needle):
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_normalised_config_is_idempotent():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    once = normalize_config(raw)
    assert once["tie_word_embeddings"] is False and once["weight_mode"] == "single"
    assert normalize_config(json.loads(json.dumps(once))) == once
