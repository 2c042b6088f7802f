"""GraniteMoeHybrid (Granite 4.0-H): the transformers oracle case, unseen
configurations (groups, with and without RoPE, dense and MoE, expert counts and
top-k, multipliers, the published config layout, transformers 5's fused
expert tensors), prefill = cached decode, bf16 / 4-bit verify, and mlx-lm's
result measured against the reference."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.loading import load_config
from hybridconv.convert import convert
from hybridconv.converters.granitemoehybrid import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    check_unseen,
    convert_case,
    max_diff,
    mlx_lm_logits,
    oracle_matches,
    prefill_equals_decode,
    unseen_case,
    verify_bf16_and_4bit,
)
from .conftest import assert_logits_close, hybrid_case, oracle_logits, random_ids, tolerance, torch_logits

CASE = "granitemoehybrid-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_matches(converted):
    w = oracle_matches(converted, CASE, ["mamba", "attention", "mamba", "attention"])
    assert w["model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"].shape == (4, 32, 64)
    assert w["model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"].shape == (4, 64, 32)
    cfg = json.loads((converted / "config.json").read_text())
    # transformers 5 wrote linear_attention / full_attention and an encoded infinity; the
    # output keeps that encoding (transformers' config classes refuse a null: convert.output_config)
    assert cfg["layer_types"] == ["mamba", "attention"] * 2
    assert cfg["time_step_limit"] == [0.0, {"__float__": "Infinity"}] and cfg["position_embedding_type"] == "rope"
    assert load_config(converted)[1]["time_step_limit"] == [0.0, None]  # normalised: no upper limit


def test_mlx_lm_matches_oracle(converted):
    """The transformers-5 config as converted (layer types, time-step limit
    rewritten) opens in mlx-lm, which computes this case correctly."""
    ids, ref = oracle_logits(hybrid_case(CASE))
    assert_logits_close(mlx_lm_logits(converted, ids), ref)


def test_prefill_equals_cached_decode(converted):
    ids = random_ids(256, 30, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=9)


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_bf16_and_4bit_verify(tmp_path):
    verify_bf16_and_4bit(hybrid_case(CASE), tmp_path)
    # the 4-bit output (stacked experts quantized, routers float) opens in mlx-lm,
    # which computes what hybridconv computes
    ids, _ = oracle_logits(hybrid_case(CASE))
    ours = np.array(hybridconv.load(tmp_path / "q4")(mx.array(ids)).astype(mx.float32))
    assert_logits_close(mlx_lm_logits(tmp_path / "q4", ids), ours)


def _config(**over):
    from transformers import GraniteMoeHybridConfig

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, shared_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=16, mamba_chunk_size=8, mamba_expand=2, position_embedding_type="rope",
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.15, logits_scaling=2.5,
        tie_word_embeddings=True, max_position_embeddings=512,
    )
    base.update(over)
    return GraniteMoeHybridConfig(**base)


def _published(cfg: dict) -> dict:
    """The layout of the published Granite 4.0-H configs: layer_types
    mamba / attention, top-level rope_theta, torch_dtype, no time_step_limit."""
    cfg = dict(cfg)
    names = {"linear_attention": "mamba", "full_attention": "attention"}
    cfg["layer_types"] = [names[t] for t in cfg["layer_types"]]
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    del cfg["time_step_limit"]
    return cfg


def test_groups2_nope_mlx_lm_differs(tmp_path):
    """n_groups = 2 and no position embedding: hybridconv matches transformers;
    mlx-lm normalises the gated RMSNorm over all groups at once: measured
    max |Δlogit| 0.198 on the converted output (0.198 too on the source
    folder rewritten to the published layout, where mlx-lm also adds RoPE
    because position_embedding_type is null; the converter writes "nope")."""
    from transformers import GraniteMoeHybridForCausalLM

    cfg = _config(mamba_n_groups=2, position_embedding_type=None)
    ids, ref, got, out = unseen_case(tmp_path, cfg, GraniteMoeHybridForCausalLM, seed=21)
    assert_logits_close(got, ref)
    assert json.loads((out / "config.json").read_text())["position_embedding_type"] == "nope"
    diff = max_diff(mlx_lm_logits(out, ids), ref)
    assert diff > 100 * tolerance(ref), diff
    assert diff == pytest.approx(0.198, abs=0.01)


def test_dense_opens_in_mlx_lm(tmp_path):
    """A dense Granite-H (no experts): the shared MLP is written under mlx-lm's
    dense names with intermediate_size = shared_intermediate_size, so mlx-lm
    opens it and computes it correctly."""
    from transformers import GraniteMoeHybridForCausalLM

    cfg = _config(num_local_experts=0, intermediate_size=1000)
    ids, ref, got, out = unseen_case(tmp_path, cfg, GraniteMoeHybridForCausalLM, seed=22)
    assert_logits_close(got, ref)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    assert_logits_close(mlx_lm_logits(out, ids), ref)


UNSEEN = {
    # 8 experts top-3, one KV head, attention bias, untied head, attention first
    "e8-top3-mqa": dict(kw=dict(num_local_experts=8, num_experts_per_tok=3, num_key_value_heads=1,
                                attention_bias=True, tie_word_embeddings=False, mamba_n_groups=4,
                                layer_types=["full_attention", "linear_attention", "linear_attention"],
                                num_hidden_layers=3, mamba_chunk_size=4)),
    # top-1, Δ clamped, conv without bias, projections with bias, rope_theta 500
    "top1-clamp": dict(kw=dict(num_experts_per_tok=1, time_step_limit=(0.05, 0.9), mamba_conv_bias=False,
                               mamba_proj_bias=True, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})),
    # the published layout, with RoPE off as in Granite 4.0-H
    "published-nope": dict(kw=dict(position_embedding_type="nope", mamba_n_groups=2), rewrite=_published),
    # the published layout with RoPE and a dense model
    "published-rope-dense": dict(kw=dict(num_local_experts=0,
                                         rope_parameters={"rope_theta": 900.0, "rope_type": "default"}),
                                 rewrite=_published),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import GraniteMoeHybridForCausalLM

    case = UNSEEN[name]
    check_unseen(tmp_path, _config(**case["kw"]), GraniteMoeHybridForCausalLM, seed=23,
                 rewrite=case.get("rewrite"))


def test_fused_expert_tensors(tmp_path):
    """A state dict in transformers 5's in-memory names (experts.gate_up_proj,
    experts.down_proj, router.weight) converts the same."""
    from safetensors.torch import save_file
    from transformers import GraniteMoeHybridForCausalLM

    from .conftest import copy_tokenizer, save_hf_transformers

    model = save_hf_transformers(tmp_path / "hf", _config(), GraniteMoeHybridForCausalLM, seed=24)
    src = tmp_path / "fused"
    src.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in state
    assert "model.layers.0.block_sparse_moe.router.weight" in state
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    copy_tokenizer(src)
    ids = random_ids(256, 17, seed=3)
    convert(str(src), tmp_path / "out", dtype="float32")
    assert_logits_close(np.array(hybridconv.load(tmp_path / "out")(mx.array(ids))), torch_logits(model, ids))


def test_config_layouts_and_errors():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    cfg = normalize_config(raw)
    assert cfg["rope_theta"] == 10000.0 and cfg["num_key_value_heads"] == 2
    assert normalize_config(cfg) == cfg  # idempotent
    published = dict(raw, layer_types=["mamba", "attention", "mamba", "attention"], rope_theta=123.0,
                     position_embedding_type=None)
    del published["rope_parameters"]
    p = normalize_config(published)
    assert p["layer_types"] == cfg["layer_types"] and p["rope_theta"] == 123.0
    assert p["position_embedding_type"] == "nope"
    for bad, match in (
        (dict(layer_types=["mamba", "moe", "mamba", "attention"]), "layer_types\\[1\\]"),
        (dict(layer_types=["mamba"]), "layer_types"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(logits_scaling=0), "logits_scaling"),
        (dict(time_step_limit=[0.0]), "time_step_limit"),
    ):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**raw, **bad})
