"""MiniMax-Text-01 (lightning attention + softmax attention, MoE, α/β residual
factors): the wave3 oracle case, unseen configurations built with transformers
(other schedules, head ratios, block sizes, a sliding window, a tied head,
sequences of several chunks), the published / remote-code config spellings,
the lightning buffers (slope kept, derived decays dropped), prefill = cached
decode with a bounded lightning state, bf16 / 4-bit verify, and what mlx-lm
does with the folders."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import plan
from hybridconv.converters.minimax import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_case,
    oracle_matches,
    prefill_equals_decode,
    unseen_case,
    verify_bf16_and_4bit,
)
from .conftest import load_builtin, assert_logits_close, decode_logits, hybrid_case, random_ids

CASE = "wave3/minimax-tiny"
KINDS = ["lightning", "attention", "lightning", "attention"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_case_matches(converted):
    w = oracle_matches(converted, CASE, KINDS)
    assert w["model.layers.0.self_attn.slope_rate"].dtype == mx.float32
    assert w["model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"].shape == (4, 64, 64)
    assert not any(k.endswith(("query_decay", "key_decay", "diagonal_decay")) for k in w)


def test_lightning_buffers_in_the_ledger():
    """slope_rate is kept (transformers reads it); the three derived decays are
    dropped with the reason, and they are the functions of slope_rate and
    block_size that the chunked core recomputes."""
    from safetensors.numpy import load_file

    p = plan(resolve(str(hybrid_case(CASE))))
    dropped = {s.source: s.dropped_because for s in p.dropped}
    assert sorted(dropped) == sorted(f"model.layers.{i}.self_attn.{b}" for i in (0, 2)
                                     for b in ("query_decay", "key_decay", "diagonal_decay"))
    assert all("recomputed from slope_rate" in r for r in dropped.values())
    w = load_file(str(hybrid_case(CASE) / "model.safetensors"))
    B = 8
    for i in (0, 2):
        s = w[f"model.layers.{i}.self_attn.slope_rate"].astype(np.float64)  # [H, 1, 1]
        r = np.arange(1, B + 1)
        np.testing.assert_allclose(w[f"model.layers.{i}.self_attn.query_decay"], np.exp(-s * r[:, None]), rtol=1e-6)
        np.testing.assert_allclose(w[f"model.layers.{i}.self_attn.key_decay"], np.exp(-s * (B - r[:, None])),
                                   rtol=1e-6)
        diff = (r[:, None] - r[None, :]).astype(np.float64)
        diag = np.where(diff >= 0, np.exp(-s * np.maximum(diff, 0)), 0.0)[None]
        np.testing.assert_allclose(w[f"model.layers.{i}.self_attn.diagonal_decay"], diag, rtol=1e-6, atol=1e-30)


def test_prefill_equals_cached_decode_and_the_state_stays_bounded(converted):
    """Across a 64-step chunk boundary; the lightning state keeps its
    [B, H, D, D] size however long the decode runs."""
    ids = random_ids(256, 75, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=66)
    prefill_equals_decode(converted, ids[:, :12], prefill=1)
    model = hybridconv.load(converted)
    cache = model.make_cache()
    assert [type(c) for c in cache] == [ArraysCache, KVCache, ArraysCache, KVCache]
    model(mx.array(ids[:, :10]), cache=cache)
    for t in range(10, 40):
        model(mx.array(ids[:, t : t + 1]), cache=cache)
    assert cache[0][1].shape == (2, 4, 16, 16) and cache[0][1].dtype == mx.float32 and cache[0][0] is None
    assert cache[1].offset == 40


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_mlx_lm_cannot_open(converted):
    """mlx-lm 0.32.2's ``minimax`` module is MiniMax-M2 (no lightning
    attention): its ModelArgs requires keys this model has no use for."""

    from hybridconv.converters import lookup

    cfg = json.loads((converted / "config.json").read_text())
    assert lookup(cfg).mlx_lm_support(cfg).status == "cannot open"
    for folder in (hybrid_case(CASE), converted):
        with pytest.raises(TypeError, match="shared_intermediate_size"):
            load_builtin(folder)


# --- unseen configurations, built and run by transformers -----------------------------


def _config(**over):
    from transformers import MiniMaxConfig

    kw = dict(
        vocab_size=256, eos_token_id=1, bos_token_id=0, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2,
        max_position_embeddings=512, block_size=16,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        full_attn_alpha_factor=2.0, full_attn_beta_factor=0.5, linear_attn_alpha_factor=1.7,
        linear_attn_beta_factor=1.1, mlp_alpha_factor=0.9, mlp_beta_factor=1.3,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    kw.update(over)
    return MiniMaxConfig(**kw)


def test_unseen_three_to_one_150_tokens(tmp_path):
    """3 lightning : 1 softmax (the released ratio's shape), 6 heads of 8
    (hidden 48 ≠ heads·head_dim), GQA 3:1, blocks of 16 in the reference,
    150 tokens (three core chunks, the last partial)."""
    from transformers import MiniMaxForCausalLM

    ids, ref, got, out = unseen_case(tmp_path, _config(), MiniMaxForCausalLM, seed=2, T=150, batch=1)
    assert_logits_close(got, ref)
    model = hybridconv.load(out)
    assert model.block_kinds() == ["lightning", "lightning", "attention", "lightning"]
    assert_logits_close(decode_logits(model, ids[:, :70], prefill=66), got[:, :70])


def test_unseen_sliding_window_tied_default_schedule(tmp_path):
    """No layer_types (transformers' default: softmax at even layers), a
    sliding window of 6 on the softmax layers, a tied head, factors 1."""
    from transformers import MiniMaxForCausalLM

    cfg = _config(layer_types=None, num_hidden_layers=3, sliding_window=6, tie_word_embeddings=True,
                  full_attn_alpha_factor=1, full_attn_beta_factor=1, linear_attn_alpha_factor=1,
                  linear_attn_beta_factor=1, mlp_alpha_factor=1, mlp_beta_factor=1)

    def no_types(c):
        c.pop("layer_types")
        return c

    ids, ref, got, out = unseen_case(tmp_path, cfg, MiniMaxForCausalLM, seed=3, T=30, rewrite=no_types)
    assert_logits_close(got, ref)
    model = hybridconv.load(out)
    assert model.block_kinds() == ["attention", "lightning", "attention"]
    assert [type(c) for c in model.make_cache()] == [RotatingKVCache, ArraysCache, RotatingKVCache]
    prefill_equals_decode(model, ids, prefill=9)


def test_remote_code_spellings(tmp_path):
    """The original config's attn_type_list, layernorm_*_alpha/beta,
    top-level rope_theta and num_experts give the same model."""
    from transformers import MiniMaxForCausalLM

    def original(c):
        c["attn_type_list"] = [0 if t == "linear_attention" else 1 for t in c.pop("layer_types")]
        for ours, theirs in (("full_attn", "full_attention"), ("linear_attn", "linear_attention"), ("mlp", "mlp")):
            for ab in ("alpha", "beta"):
                c[f"layernorm_{theirs}_{ab}"] = c.pop(f"{ours}_{ab}_factor")
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["num_experts"] = c.pop("num_local_experts")
        c["postnorm"] = True
        return c

    ids, ref, got, out = unseen_case(tmp_path, _config(num_hidden_layers=2, layer_types=["full_attention",
                                                                                           "linear_attention"]),
                                     MiniMaxForCausalLM, seed=5, T=20, rewrite=original)
    assert_logits_close(got, ref)
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "linear_attention"] and written["mlp_beta_factor"] == 1.3


def test_config_errors():
    base = json.loads((hybrid_case(CASE) / "config.json").read_text())

    def refused(match, **over):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**base, **over})

    refused("layer_types", layer_types=["linear_attention"] * 3)
    refused("layer_types", layer_types=["sliding_attention"] * 4)
    refused("attn_type_list", layer_types=None, attn_type_list=[0, 2, 0, 1])
    refused("postnorm", postnorm=False)
    refused("rope type 'linear'", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    refused("num_experts_per_tok", num_experts_per_tok=5)
    refused("num_key_value_heads", num_key_value_heads=3)
    cfg = normalize_config({k: v for k, v in base.items() if k not in ("rope_parameters",)})
    assert cfg["rope_theta"] == 1e6  # MiniMax's default_theta


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, tokens=64, seed=2)
    for name, r in reports.items():
        print(name, r["verdict"], {k: r["metrics"]["overall"].get(k) for k in ("kl_mean", "top1_agreement")})
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.slope_rate", "model.layers.0.self_attn.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert w[name].dtype == mx.float32, name
    assert "model.layers.0.self_attn.qkv_proj.scales" in w and "model.layers.1.self_attn.o_proj.scales" in w
    assert "model.layers.0.block_sparse_moe.gate.scales" not in w  # the router stays float
