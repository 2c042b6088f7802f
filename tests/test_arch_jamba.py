"""Jamba: the transformers oracle case, unseen configurations (periods and
offsets, expert counts and top-k, dense, tied, biases, the published layout,
transformers 5's fused expert tensors), prefill = cached decode, bf16 / 4-bit
verify, and mlx-lm's result measured against the reference."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert
from hybridconv.converters import lookup
from hybridconv.converters.jamba import normalize_config
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

CASE = "jamba-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_matches(converted):
    w = oracle_matches(converted, CASE, ["mamba", "attention", "mamba", "attention"])
    # experts stacked in mlx-lm's layout; expert layers 0 and 2 (offset 0, period 2)
    assert w["model.layers.0.feed_forward.switch_mlp.gate_proj.weight"].shape == (4, 128, 64)
    assert w["model.layers.2.feed_forward.switch_mlp.down_proj.weight"].shape == (4, 64, 128)
    assert "model.layers.1.feed_forward.gate_proj.weight" in w
    assert all(w[n].dtype == mx.float32 for n in w if n.endswith(("A_log", ".D", "dt_proj.bias")))


def test_mlx_lm_renormalises_router_weights(converted):
    """mlx-lm opens the output but renormalises the top-2 router weights, which
    transformers does not: measured max |Δlogit| 0.845 on the oracle case."""
    ids, ref = oracle_logits(hybrid_case(CASE))
    diff = max_diff(mlx_lm_logits(converted, ids), ref)
    assert diff > 100 * tolerance(ref)
    assert diff == pytest.approx(0.845, abs=0.01)


def test_prefill_equals_cached_decode(converted):
    ids = random_ids(256, 30, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=7)


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_bf16_and_4bit_verify(tmp_path):
    verify_bf16_and_4bit(hybrid_case(CASE), tmp_path)
    # the 4-bit output opens in mlx-lm (its result differs by its routing, above)
    ids, _ = oracle_logits(hybrid_case(CASE))
    assert mlx_lm_logits(tmp_path / "q4", ids).shape == (1, ids.shape[1], 256)


def _config(**over):
    from transformers import JambaConfig

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto",
        max_position_embeddings=512, use_mamba_kernels=False,
    )
    base.update(over)
    return JambaConfig(**base)


def _published(cfg: dict) -> dict:
    """The layout of AI21's published configs: torch_dtype, dt rank as
    written there, num_experts (not num_local_experts)."""
    cfg = dict(cfg)
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["use_mamba_kernels"] = True
    return cfg


UNSEEN = {
    # experts from layer 2 every 3 layers, attention at 0 and 3: 6 experts, top-3
    "offset-experts": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=0,
                           expert_layer_period=3, expert_layer_offset=2, num_experts=6, num_experts_per_tok=3),
    # top-1 of 8, one KV head, explicit dt rank, biases, no conv bias
    "top1-mqa-bias": dict(num_experts=8, num_experts_per_tok=1, num_key_value_heads=1, mamba_dt_rank=6,
                          mamba_proj_bias=True, mamba_conv_bias=False, attn_layer_period=4, attn_layer_offset=3),
    # one expert: every feed-forward dense; tied head
    "dense-tied": dict(num_experts=1, tie_word_embeddings=True, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import JambaForCausalLM

    check_unseen(tmp_path, _config(**UNSEEN[name]), JambaForCausalLM, seed=11)


def test_published_layout(tmp_path):
    from transformers import JambaForCausalLM

    check_unseen(tmp_path, _config(expert_layer_offset=0, num_experts=3), JambaForCausalLM, seed=12,
                 rewrite=_published)


def test_expert_offset_mlx_lm_cannot_load(tmp_path):
    """Experts at i % 4 == 1 (transformers); mlx-lm tests (i + 1) % 4 == 0, puts
    experts on layer 3 instead of 1, and the weights do not fit its model."""
    from transformers import JambaForCausalLM

    cfg = _config(expert_layer_period=4, expert_layer_offset=1)
    ids, ref, got, out = unseen_case(tmp_path, cfg, JambaForCausalLM, seed=13)
    assert_logits_close(got, ref)
    with pytest.raises(ValueError):
        mlx_lm_logits(out, ids)


def test_fused_expert_tensors(tmp_path):
    """A state dict saved in transformers 5's in-memory layout (experts fused
    as gate_up_proj [E, 2I, H] and down_proj [E, H, I]) converts the same."""
    from safetensors.torch import save_file
    from transformers import JambaForCausalLM

    from .conftest import copy_tokenizer, save_hf_transformers

    cfg = _config()
    model = save_hf_transformers(tmp_path / "hf", cfg, JambaForCausalLM, seed=14)
    src = tmp_path / "fused"
    src.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in state
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    copy_tokenizer(src)
    ids = random_ids(256, 17, seed=3)
    convert(str(src), tmp_path / "out", dtype="float32")
    assert_logits_close(np.array(hybridconv.load(tmp_path / "out")(mx.array(ids))), torch_logits(model, ids))


def test_config_layouts_and_errors():
    raw = _config().to_dict()
    cfg = normalize_config(raw)
    # the schedule comes from the periods; the list is not written (transformers' JambaConfig refuses it)
    assert "layers_block_type" not in cfg
    assert [k for k, _ in lookup(cfg).schedule(cfg)] == ["mamba", "attention"] * 2
    assert cfg["mamba_dt_rank"] == 4 and cfg["num_experts"] == 4
    assert normalize_config(cfg) == cfg  # idempotent
    alias = dict(raw, num_local_experts=5, mamba_dt_rank="auto")
    del alias["num_experts"]
    assert normalize_config(alias)["num_experts"] == 5
    for bad, match in (
        (dict(attn_layer_offset=2), "attn_layer_offset"),
        (dict(expert_layer_offset=5), "expert_layer_offset"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(layers_block_type=["attention"] * 4), "disagrees"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**raw, **bad})
    json.dumps(cfg)  # the written config is plain JSON
