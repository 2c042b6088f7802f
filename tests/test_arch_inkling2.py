"""Inkling-2 (text): the oracle case (the original checkpoint names, restored by
transformers on save; static and dynamic short convolutions, attention residuals
over blocks of 2 layers, log scaling past position 8, q/k L2 clip, sinks,
soft-capped experts and logits, a padded vocabulary), unseen configurations
built with transformers (other block sizes, caps and clips that bite, windows
and extents shorter than the input, head shapes per layer type, kernel sizes,
padding), prefill = cached decode, each block on the reference's input, bf16 /
4-bit verify, and mlx-lm (no Inkling-2 there)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.inkling2 import normalize_config

from hybridconv.errors import ConfigError

from .arch_checks import assert_reconvert_is_noop, convert_matches, oracle_case, prefill_equals_decode, verify_bf16_and_4bit
from .conftest import load_builtin, hybrid_case, random_ids, save_hf_transformers, torch_logits

CASE = "wave3/inkling2-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_layout_and_decode(oracle, tmp_path):
    import mlx.core as mx
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == ["attention"] * 4
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.1.attention_input.query").get_shape() == [3, 64]  # attn_queries.0
        assert f.get_slice("model.layers.0.mlp.switch_mlp.gate_up_proj.weight").get_shape() == [4, 64, 64]
        assert f.get_slice("lm_head.weight").get_shape() == [256, 64]
        assert f.get_slice("model.layers.0.mlp.gate.weight").get_dtype() == "F32"
    assert not any("attn_res" in n or ".llm." in n for n in names) and "model.final_input.query" in names
    assert "model.layers.1.self_attn.k_proj.sconv.weight_proj.weight" in names
    # blocks pass (p, B): verify sees p
    hidden: list = []
    model(mx.array(ids), hidden_states=hidden)
    assert [h.shape for h in hidden] == [(1, 24, 64)] * 4
    prefill_equals_decode(model, ids, prefill=3)
    assert_reconvert_is_noop(out, tmp_path)


def test_mlx_lm_has_no_inkling2(oracle):
    import importlib.util


    assert importlib.util.find_spec("mlx_lm.models.inkling2_text") is None
    with pytest.raises(ValueError, match="not supported"):
        load_builtin(oracle[1])


def _config(**over):
    from transformers import Inkling2TextConfig

    kw = dict(vocab_size=256, unpadded_vocab_size=250, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
              swa_head_dim=16, sliding_window_size=6, d_rel=4, rel_extent=16, log_scaling_n_floor=8,
              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, route_scale=2.0,
              n_layers_per_attn_res_block=2, max_position_embeddings=256,
              layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"], eos_token_id=1)
    kw.update(over)
    return Inkling2TextConfig(**kw)


UNSEEN = {
    # blocks of 3 over 5 layers, log scaling from position 4, small window / extent,
    # other head shapes on the sliding layers, kernel 3, top-1 of 3, padding 240 of 256
    "blocks3-shapes-k3": dict(
        num_hidden_layers=5, n_layers_per_attn_res_block=3, log_scaling_n_floor=4, sliding_window_size=5,
        rel_extent=6, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=8, conv_kernel_size=3,
        n_routed_experts=3, num_experts_per_tok=1, unpadded_vocab_size=240,
        layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid", "hybrid_sliding"]),
    # every layer a block boundary, caps and clips that bite, kernel 2, the default
    # schedule (full at 5 of 6), an unpadded vocabulary
    "blocks1-tight-caps": dict(
        num_hidden_layers=6, n_layers_per_attn_res_block=1, layer_types=None, mlp_gate_softcap=0.5,
        mlp_up_softcap=0.5, final_logit_softcapping=2.0, qk_l2_clip_threshold=0.5, rel_l2_clip_threshold=0.3,
        conv_kernel_size=2, unpadded_vocab_size=256),
}


def _build(tmp, config, seed):
    """A transformers checkpoint with random routing biases (buffers, not
    perturbed by save_hf_transformers); (source, ids, reference logits)."""
    import torch
    from transformers import Inkling2ForCausalLM

    src = tmp / "src"
    model = save_hf_transformers(src, config, Inkling2ForCausalLM, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            b = layer.mlp.gate.e_score_correction_bias
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.save_pretrained(src)
    ids = random_ids(256, 21, batch=2, seed=seed)
    return src, ids, torch_logits(model, ids)


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    src, ids, ref = _build(tmp_path, _config(**UNSEEN[name]), seed=3)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    prefill_equals_decode(model, ids, prefill=4)


def test_config_aliases(tmp_path):
    """transformers' attribute_map spellings (intermediate_size for the experts'
    width, routed_scaling_factor, sconv_kernel_size, sliding_window,
    num_local_experts, model_max_length) read as it reads them."""
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    aliased = dict(raw)
    for old, new in (("moe_intermediate_size", "intermediate_size"), ("route_scale", "routed_scaling_factor"),
                     ("conv_kernel_size", "sconv_kernel_size"), ("sliding_window_size", "sliding_window"),
                     ("n_routed_experts", "num_local_experts"), ("max_position_embeddings", "model_max_length")):
        aliased[new] = aliased.pop(old)
    assert normalize_config(aliased) == normalize_config(raw)


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert reports["q4"]["model"]["precision"] == "4bit"


@pytest.mark.parametrize("change,needle", [
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"unpadded_vocab_size": 300}, "unpadded_vocab_size"),
    ({"layer_types": ["hybrid"]}, "layer_types has 1 entries"),
    ({"num_experts_per_tok": 9}, "exceeds"),
    ({"mlp_up_softcap": -1.0}, "mlp_up_softcap"),
    ({"swa_num_key_value_heads": 3}, "swa_num_key_value_heads"),
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
