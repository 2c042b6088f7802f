"""Inkling (text): the oracle case (k/v and residual-branch short convolutions,
relative position bias, sliding + full layers, sigmoid MoE with a shared-expert
sink), unseen configurations built with transformers (log scaling, a padded
vocabulary, other head shapes per layer type, extents shorter than the
sequence, dense and sparse layers, shared-expert counts), the checkpoints'
config spellings (``dense_intermediate_size``, ``sconv_kernel_size``,
``local_layer_ids``, ``dense_mlp_idx``, ...), prefill = cached decode past the
window, bf16 / 4-bit verify, and mlx-lm (no Inkling there)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.inkling import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_matches,
    oracle_case,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import load_builtin, hybrid_case, random_ids

CASE = "wave3/inkling-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_layout_and_decode(oracle, tmp_path):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == ["attention"] * 4
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_sconv.conv1d.weight").get_shape() == [32, 4, 1]
        assert f.get_slice("model.layers.1.mlp.shared_experts.gate_proj.weight").get_shape() == [1, 32, 64]
    assert {"model.embed_norm.weight", "model.layers.1.mlp.switch_mlp.up_proj.weight", "lm_head.weight"} <= names
    prefill_equals_decode(model, ids, prefill=3)  # window 8 of 24 tokens
    assert_reconvert_is_noop(out, tmp_path)


def test_mlx_lm_has_no_inkling(oracle):
    import importlib.util


    assert importlib.util.find_spec("mlx_lm.models.inkling_text") is None
    with pytest.raises(ValueError, match="not supported"):
        load_builtin(oracle[1])


def _config(**over):
    from transformers import InklingTextConfig

    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
              sliding_window_size=6, d_rel=4, rel_extent=16, intermediate_size=96, moe_intermediate_size=32,
              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, route_scale=2.0,
              logits_mup_width_multiplier=2.0, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
              mlp_layer_types=["dense", "sparse", "sparse", "sparse"], max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return InklingTextConfig(**kw)


UNSEEN = {
    # log scaling from position 4 on the full layers, a padded head (250 of 256 rows
    # used), other head shapes on the sliding layers, extents shorter than the input,
    # kernel 3, dense layers in between
    "logscale-unpadded-shapes": dict(
        log_scaling_n_floor=4, log_scaling_alpha=0.3, unpadded_vocab_size=250, swa_num_attention_heads=2,
        swa_num_key_value_heads=1, swa_head_dim=8, rel_extent=5, d_rel=3, conv_kernel_size=3,
        layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"],
        mlp_layer_types=["sparse", "dense", "sparse", "dense"]),
    # three shared experts, top-1 of 6, kernel 2, one KV head, the default schedule
    # of 6 layers (full at 5)
    "shared3-top1-default-schedule": dict(
        n_shared_experts=3, num_experts_per_tok=1, n_routed_experts=6, conv_kernel_size=2, num_key_value_heads=1,
        num_hidden_layers=6, layer_types=None, mlp_layer_types=None),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import InklingForCausalLM

    ids = random_ids(256, 21, batch=2, seed=2)
    src, ref = transformers_case(tmp_path, _config(**UNSEEN[name]), InklingForCausalLM, ids, seed=3)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    prefill_equals_decode(model, ids, prefill=4)


def _checkpoint_spelling(cfg: dict) -> dict:
    """The keys Thinking Machines' configs use (transformers maps them): the
    experts' width as intermediate_size beside dense_intermediate_size,
    sconv_kernel_size, model_max_length, sliding_window, num_local_experts,
    embedding_multiplier, local_layer_ids, dense_mlp_idx."""
    cfg = dict(cfg)
    cfg["dense_intermediate_size"] = cfg.pop("intermediate_size")
    cfg["intermediate_size"] = cfg.pop("moe_intermediate_size")
    cfg["sconv_kernel_size"] = cfg.pop("conv_kernel_size")
    cfg["model_max_length"] = cfg.pop("max_position_embeddings")
    cfg["sliding_window"] = cfg.pop("sliding_window_size")
    cfg["num_local_experts"] = cfg.pop("n_routed_experts")
    cfg["embedding_multiplier"] = cfg.pop("logits_mup_width_multiplier")
    cfg["local_layer_ids"] = [i for i, t in enumerate(cfg.pop("layer_types")) if t == "hybrid_sliding"]
    kinds = cfg.pop("mlp_layer_types")
    cfg["dense_mlp_idx"] = kinds.count("dense")
    assert kinds == ["dense"] * cfg["dense_mlp_idx"] + ["sparse"] * (len(kinds) - cfg["dense_mlp_idx"])
    return cfg


def test_checkpoint_config_spelling(tmp_path):
    from transformers import InklingForCausalLM

    ids = random_ids(256, 13, seed=7)
    config = _config(mlp_layer_types=["dense", "dense", "sparse", "sparse"], conv_kernel_size=3)
    src, ref = transformers_case(tmp_path, config, InklingForCausalLM, ids, seed=8, rewrite=_checkpoint_spelling)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    assert model.args.intermediate_size == 96 and model.args.moe_intermediate_size == 32


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert reports["q4"]["model"]["precision"] == "4bit"


@pytest.mark.parametrize("change,needle", [
    ({"n_shared_experts": 0}, "n_shared_experts"),
    ({"num_experts_per_tok": 9}, "exceeds"),
    ({"layer_types": ["hybrid", "sliding_attention", "hybrid", "hybrid"]}, "layer_types entry"),
    ({"mlp_layer_types": ["dense", "moe", "sparse", "sparse"]}, "mlp_layer_types"),
    ({"unpadded_vocab_size": 300}, "unpadded_vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
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
