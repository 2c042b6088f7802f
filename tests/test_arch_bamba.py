"""Bamba: the transformers oracle case, unseen configurations (layer indices,
groups, biases, tied head, time-step clamp, the published config layout),
prefill = cached decode, bf16 / 4-bit verify, and mlx-lm (which has no Bamba)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from hybridconv.converters.bamba import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    check_unseen,
    convert_case,
    oracle_matches,
    prefill_equals_decode,
    verify_bf16_and_4bit,
)
from .conftest import hybrid_case, random_ids

CASE = "bamba-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_matches(converted):
    w = oracle_matches(converted, CASE, ["mamba", "attention", "mamba", "attention"])
    assert w["model.layers.0.mamba.conv1d.weight"].shape == (160, 4, 1)
    assert all(w[n].dtype == mx.float32 for n in w if n.endswith(("A_log", ".D", "dt_bias")))


def test_prefill_equals_cached_decode(converted):
    # chunk size 8: the prefill spans a chunk boundary, decoding crosses two more
    ids = random_ids(256, 30, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=11)


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_mlx_lm_has_no_bamba(converted):
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    with pytest.raises(ValueError, match="bamba not supported"):
        load_model(converted)


def test_bf16_and_4bit_verify(tmp_path):
    verify_bf16_and_4bit(hybrid_case(CASE), tmp_path)


def _config(**over):
    from transformers import BambaConfig

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1, 3],
        mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=8, mamba_expand=2,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    base.update(over)
    return BambaConfig(**base)


def _published(cfg: dict) -> dict:
    """The layout of the published Bamba configs: top-level rope_theta and
    attn_rotary_emb, torch_dtype, mamba_d_head "auto", no time_step_limit."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["attn_rotary_emb"] = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["mamba_d_head"] = "auto"
    del cfg["time_step_limit"]
    return cfg


UNSEEN = {
    # two B/C groups, one KV head, attention first and last, 3-chunk sequences
    "groups2-mqa": dict(kw=dict(mamba_n_groups=2, num_key_value_heads=1, attn_layer_indices=[0, 4],
                                num_hidden_layers=5, mamba_chunk_size=4)),
    # biases everywhere, tied head, Δ clamped, a wider rotary base
    "bias-tied-clamp": dict(kw=dict(attention_bias=True, mlp_bias=True, mamba_conv_bias=False,
                                    mamba_proj_bias=True, tie_word_embeddings=True,
                                    time_step_limit=(0.05, 0.8),
                                    rope_parameters={"rope_theta": 500.0, "rope_type": "default"})),
    # no attention at all
    "all-mamba": dict(kw=dict(attn_layer_indices=None, num_hidden_layers=3, mamba_n_heads=4)),
    # the published config layout (top-level rope_theta, attn_rotary_emb, torch_dtype)
    "published-layout": dict(kw=dict(rope_parameters={"rope_theta": 700.0, "rope_type": "default"},
                                     mamba_n_groups=4, attn_layer_indices=[2]), rewrite=_published),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import BambaForCausalLM

    case = UNSEEN[name]
    check_unseen(tmp_path, _config(**case["kw"]), BambaForCausalLM, seed=7, rewrite=case.get("rewrite"))


def test_config_layouts_and_errors():
    raw = _config().to_dict()
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]  # as transformers 5 writes it
    cfg = normalize_config(raw)
    assert cfg["attn_layer_indices"] == [1, 3] and cfg["time_step_limit"] == [0.0, None]
    assert cfg["mamba_d_head"] == 16 and cfg["rope_theta"] == 10000.0
    assert normalize_config(cfg) == cfg  # idempotent
    listed = dict(raw, attn_layer_indices=None,
                  layers_block_type=["linear_attention", "full_attention", "mamba", "attention"])
    assert normalize_config(listed)["attn_layer_indices"] == [1, 3]
    for bad, match in (
        (dict(attn_layer_indices=[1, 4]), "attn_layer_indices"),
        (dict(attn_rotary_emb=16), "attn_rotary_emb"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(mamba_d_head=32), "mamba_n_heads \\* mamba_d_head"),
        (dict(time_step_limit=[1.0, 0.5]), "time_step_limit"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope type"),
    ):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**raw, **bad})
