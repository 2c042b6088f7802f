"""ZAYA1: the oracle case (CCA with q/k convolutions and half-delayed values, L2
q/k norm with key scale, partial RoPE, sliding layers, MLP router with a skip
expert and depth-mixed router state, residual scaling), unseen configurations
built with transformers (conv widths, GQA ratios, biases, untied head and head
bias, windows, skip-expert choices), the published layout (a stray
``rope_type`` in ``rope_parameters``, defaults), prefill = cached decode past the
window, bf16 / 4-bit verify, and mlx-lm (no ZAYA there)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridconv.converters.zaya import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import assert_reconvert_is_noop, convert_matches, oracle_case, prefill_equals_decode, verify_bf16_and_4bit
from .conftest import load_builtin, hybrid_case, random_ids, save_hf_transformers, torch_logits

CASE = "wave3/zaya-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_layout_and_decode(oracle, tmp_path):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == ["attention"] * 4
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.qkv_proj.conv_qk_depthwise.weight").get_shape() == [96, 2, 1]
        assert f.get_slice("model.layers.0.self_attn.qkv_proj.conv_qk_grouped.weight").get_shape() == [96, 16, 2]
        assert f.get_slice("model.layers.1.mlp.switch_mlp.gate_proj.weight").get_shape() == [4, 64, 64]
        assert f.get_slice("model.layers.1.mlp.gate.balancing_biases").get_dtype() == "F32"
    assert "model.layers.3.mlp.switch_mlp.down_proj.weight" in names
    # 24 tokens, window 8, conv and delayed-value state
    prefill_equals_decode(model, ids, prefill=3)
    assert_reconvert_is_noop(out, tmp_path)


def test_block_outputs_are_the_residual_stream(oracle):
    """Blocks pass [h | router state]; what verify compares (block_output) is h,
    as transformers' decoder layer returns it."""
    import mlx.core as mx

    _, _, model, ids, _ = oracle
    hidden: list = []
    model(mx.array(ids), hidden_states=hidden)
    assert [h.shape[-1] for h in hidden] == [64] * 4 and all(h.dtype == mx.float32 for h in hidden)
    full = model.call_layer(model.layers[0], model.embed(mx.array(ids)), None, model.embed(mx.array(ids)))
    assert full.shape[-1] == 64 + 32


def test_mlx_lm_has_no_zaya(oracle):
    import importlib.util


    assert importlib.util.find_spec("mlx_lm.models.zaya") is None
    with pytest.raises(ValueError, match="not supported"):
        load_builtin(oracle[1])


def _config(**over):
    from transformers import ZayaConfig

    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, moe_intermediate_size=48, num_experts=4, router_hidden_size=32, sliding_window=6,
              max_position_embeddings=256, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return ZayaConfig(**kw)


UNSEEN = {
    # wider depthwise conv, one KV head (groups of 4), biases, untied head with a bias
    "conv3-mqa-bias-untied": dict(cca_time0=3, cca_time1=2, num_key_value_heads=1, attention_bias=True,
                                  tie_word_embeddings=False, lm_head_bias=True),
    # no depthwise taps beyond the current one, grouped conv of 3, MHA, a tied head with a
    # bias, other RoPE tables (whole head on the full layers), 5 layers
    "grouped3-mha-tiedbias": dict(cca_time0=1, cca_time1=3, num_key_value_heads=4, lm_head_bias=True,
                                  num_hidden_layers=5, head_dim=8,
                                  layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid", "hybrid"],
                                  rope_parameters={
                                      "hybrid": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.0},
                                      "hybrid_sliding": {"rope_type": "default", "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.5}}),
}


def _build(tmp, config, seed, rewrite=None):
    """A transformers checkpoint whose balancing biases (buffers, not perturbed by
    save_hf_transformers) are random, the skip class favoured so that some tokens
    skip and some do not; (source, ids, reference logits)."""
    import torch
    from transformers import ZayaForCausalLM

    src = tmp / "src"
    model = save_hf_transformers(src, config, ZayaForCausalLM, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            b = layer.mlp.gate.balancing_biases
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            b[-1] = 0.15
    model.save_pretrained(src)
    ids = random_ids(256, 19, batch=2, seed=seed)
    ref = torch_logits(model, ids)
    if rewrite is not None:
        path = src / "config.json"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
    return src, ids, ref


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    src, ids, ref = _build(tmp_path, _config(**UNSEEN[name]), seed=3)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    prefill_equals_decode(model, ids, prefill=4)


def _published(cfg: dict) -> dict:
    """As Zyphra/ZAYA1-8B's config.json: a top-level rope_type beside the nested
    tables (transformers deletes it), no layer_types (all 'hybrid': the default)."""
    cfg = dict(cfg)
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": "default"}
    assert set(cfg.pop("layer_types")) == {"hybrid"}
    return cfg


def test_published_layout(tmp_path):
    config = _config(layer_types=None, num_hidden_layers=3, sliding_window=None)
    src, ids, ref = _build(tmp_path, config, seed=4, rewrite=_published)
    convert_matches(src, tmp_path / "out", ids, ref)


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    plan = json.loads((tmp_path / "q4" / "conversion.json").read_text())["quantization"]["plan"]
    router = [t for t in plan if ".mlp.gate." in t["tensor"] and t["tensor"].endswith("proj.weight")]
    assert router and all(t["decision"] == "float" for t in router)
    assert reports["q4"]["model"]["precision"] == "4bit"


@pytest.mark.parametrize("change,needle", [
    ({"num_experts_per_tok": 2}, "one expert"),
    ({"layer_types": ["hybrid", "full_attention", "hybrid", "hybrid"]}, "layer_types entry 'full_attention'"),
    ({"layer_types": ["hybrid"]}, "layer_types has 1 entries"),
    ({"sliding_window": None}, "sliding_window is not set"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "not nested"),
    ({"rope_parameters": {"hybrid": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "hybrid_sliding": {"rope_theta": 1e4}}}, "'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_configs(change, needle):
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_normalised_config_is_idempotent():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    once = normalize_config(raw)
    assert normalize_config(json.loads(json.dumps(once))) == once
    assert np.isclose(once["rope_parameters"]["hybrid"]["rope_theta"], 5e6)
