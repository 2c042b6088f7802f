"""Lara-Mini (gated DeltaNet + sliding / NoPE full attention, MoE + shared
expert): the wave3 oracle case, unseen configurations built with transformers
(other patterns, windows, head ratios, untied head, biases, no top-k
renormalisation, several delta-rule chunks, the published config layout,
per-expert tensors), prefill = cached decode across windows and chunks,
bf16 / 4-bit verify, and what mlx-lm does with the folders."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
import numpy as np
import pytest

import hybridconv
from hybridconv.converters.lara_mini import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_case,
    oracle_matches,
    prefill_equals_decode,
    unseen_case,
    verify_bf16_and_4bit,
)
from .conftest import assert_logits_close, decode_logits, hybrid_case, random_ids

CASE = "wave3/lara_mini-tiny"
KINDS = ["delta", "attention", "delta", "attention", "attention"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_case_matches(converted):
    w = oracle_matches(converted, CASE, KINDS)
    # the fused in_proj cut into Qwen3.5's four projections, experts into switch_mlp
    assert w["model.layers.0.linear_attn.in_proj_qkv.weight"].shape == (128, 64)
    assert w["model.layers.0.linear_attn.in_proj_b.weight"].shape == (4, 64)
    assert w["model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (4, 32, 64)
    assert "model.layers.0.linear_attn.norm.weight" in w and "lm_head.weight" not in w
    model = hybridconv.load(converted)
    caches = model.make_cache()
    assert [type(c) for c in caches] == [ArraysCache, RotatingKVCache, ArraysCache, KVCache, RotatingKVCache]
    assert model.layers[1].self_attn.rope is not None and model.layers[3].self_attn.rope is None  # full: NoPE


def test_prefill_equals_cached_decode(converted):
    """Past the window (8) and across a 64-step delta-rule chunk boundary."""
    ids = random_ids(256, 75, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=66)
    prefill_equals_decode(converted, ids[:, :20], prefill=1)


def test_window_cache_stays_bounded(converted):
    model = hybridconv.load(converted)
    cache = model.make_cache()
    ids = random_ids(256, 30, seed=1)
    model(mx.array(ids[:, :20]), cache=cache)
    for t in range(20, 30):
        model(mx.array(ids[:, t : t + 1]), cache=cache)
    assert cache[1].keys.shape[2] == 8 and cache[3].offset == 30  # the window (mlx-lm RotatingKVCache) and the whole history
    assert cache[0][1].shape == (1, 4, 16, 16)


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_mlx_lm_cannot_open():
    """mlx-lm 0.32.2 has no lara_mini module (measured: "Model type lara_mini not supported.")."""
    from hybridconv.converters import lookup

    cfg = normalize_config(json.loads((hybrid_case(CASE) / "config.json").read_text()))
    verdict = lookup(cfg).mlx_lm_support(cfg)
    assert verdict.status == "cannot open"
    from mlx_lm.utils import load_model

    with pytest.raises(ValueError, match="lara_mini not supported"):
        load_model(hybrid_case(CASE))


# --- unseen configurations, built and run by transformers ---------------------------


def _config(**over):
    from transformers import LaraMiniConfig

    kw = dict(
        vocab_size=256, eos_token_id=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=8, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, max_position_embeddings=512, sliding_window=5,
        layer_types=["full_attention", "linear_attention", "sliding_attention", "linear_attention"],
        tie_word_embeddings=False, norm_topk_prob=False, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    kw.update(over)
    return LaraMiniConfig(**kw)


def test_unseen_full_first_untied_bias_150_tokens(tmp_path):
    """Full attention first, window 5, GQA 4:1, value heads = key heads, untied
    head, attention biases, no renormalisation; 150 tokens = three delta-rule
    chunks, the last partial."""
    from transformers import LaraMiniForCausalLM

    ids, ref, got, out = unseen_case(tmp_path, _config(), LaraMiniForCausalLM, seed=2, T=150, batch=1)
    assert_logits_close(got, ref)
    model = hybridconv.load(out)
    assert model.block_kinds() == ["attention", "delta", "attention", "delta"]
    assert_logits_close(decode_logits(model, ids[:, :70], prefill=66), got[:, :70])


def test_published_layout_per_expert(tmp_path):
    """The published layout: no layer_types (the released period-5 pattern),
    top-level rope_theta, and experts stored one by one."""
    from safetensors.numpy import load_file, save_file
    from transformers import LaraMiniForCausalLM

    cfg = _config(num_hidden_layers=5, layer_types=None, tie_word_embeddings=True, attention_bias=False,
                  norm_topk_prob=True, linear_num_value_heads=4, sliding_window=8)

    def published(c):
        c.pop("layer_types")
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        return c

    def per_expert(src):
        w = load_file(str(src / "model.safetensors"))
        for name in [k for k in w if k.endswith("experts.gate_up_proj")]:
            pre = name[: -len("gate_up_proj")]
            gu, down = w.pop(name), w.pop(pre + "down_proj")
            for e in range(gu.shape[0]):
                w[f"{pre}{e}.gate_proj.weight"], w[f"{pre}{e}.up_proj.weight"] = np.split(gu[e], 2)
                w[f"{pre}{e}.down_proj.weight"] = down[e]
        save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
        return w

    from .arch_checks import transformers_case

    ids = random_ids(256, 40, batch=2, seed=3)
    src, ref = transformers_case(tmp_path, cfg, LaraMiniForCausalLM, ids, seed=3, rewrite=published)
    per_expert(src)
    raw = json.loads((src / "config.json").read_text())
    assert "layer_types" not in raw and raw["rope_theta"] == 5000.0
    from hybridconv.convert import convert

    convert(str(src), tmp_path / "out", dtype="float32")
    model = hybridconv.load(tmp_path / "out")
    assert model.block_kinds() == ["delta", "attention", "delta", "attention", "attention"]
    assert [l.window for l in model.layers] == [None, 8, None, None, 8]
    assert_logits_close(np.array(model(mx.array(ids))), ref)


def test_config_errors():
    base = json.loads((hybrid_case(CASE) / "config.json").read_text())

    def refused(match, **over):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**base, **over})

    refused("layer_types", layer_types=["linear_attention"] * 4)
    refused("layer_types", layer_types=["mamba"] * 5)
    refused("rope type 'yarn'", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    refused("linear_num_value_heads", linear_num_value_heads=3)
    refused("num_experts_per_tok", num_experts_per_tok=5)
    refused("hidden_act", hidden_act="gelu")
    cfg = normalize_config({k: v for k, v in base.items() if k not in ("head_dim", "layer_types")})
    assert cfg["head_dim"] == 128  # transformers' default, not hidden_size / heads
    assert cfg["layer_types"] == ["linear_attention", "sliding_attention", "linear_attention", "full_attention",
                                  "sliding_attention"]


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, tokens=64, seed=2)
    for name, r in reports.items():
        print(name, r["verdict"], {k: r["metrics"]["overall"].get(k) for k in ("kl_mean", "top1_agreement")})
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name in ("model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
                 "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.norm.weight",
                 "model.layers.1.self_attn.q_norm.weight"):
        assert w[name].dtype == mx.float32, name
    assert "model.layers.1.self_attn.o_proj.scales" in w
    assert "model.layers.0.mlp.gate.scales" not in w  # the router stays float
