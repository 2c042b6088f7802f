"""Ling-3 (``bailing_hybrid``: KDA + gated MLA with interleaved RoPE,
group-limited sigmoid MoE): the wave3 oracle case, unseen configurations built
with transformers (MLA first, a query LoRA, biases, Kimi's unbounded forget
gate, one expert group, several delta-rule chunks), the released config layout
(KDA sizes in head_dim, layer_group_size, MTP layers stored after the
decoder), transformers' in-memory tensor names, prefill = cached decode with
the absorbed MLA step, bf16 / 4-bit verify, and what mlx-lm does — it computes
the converted folders through its bailing_moe_v3 module."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.converters import lookup
from hybridconv.converters.bailing_hybrid import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_case,
    mlx_lm_logits,
    oracle_matches,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import assert_logits_close, hybrid_case, oracle_logits, random_ids

CASE = "wave3/bailing_hybrid-tiny"
KINDS = ["kda", "attention", "kda", "attention"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_case_matches_hybridconv_and_mlx_lm(converted):
    w = oracle_matches(converted, CASE, KINDS)
    # the checkpoint's (and mlx-lm's) names; KDA's output projection o_proj, MLA's dense
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.o_proj.weight",
                 "model.layers.1.attention.dense.weight", "model.layers.1.mlp.gate.expert_bias",
                 "model.layers.1.mlp.switch_mlp.gate_proj.weight"):
        assert name in w, name
    assert w["model.layers.0.attention.q_conv1d.weight"].shape == (64, 4, 1)
    assert w["model.layers.1.mlp.gate.weight"].dtype == mx.float32
    written = json.loads((converted / "config.json").read_text())
    assert written["architectures"] == ["BailingMoeV3ForCausalLM"] and written["head_dim"] == 16
    ids, ref = oracle_logits(hybrid_case(CASE))
    assert_logits_close(mlx_lm_logits(converted, ids), ref)
    cfg = normalize_config(json.loads((hybrid_case(CASE) / "config.json").read_text()))
    assert lookup(cfg).mlx_lm_support(cfg).status == "computes"


def test_mlx_lm_cannot_read_the_source():
    """mlx-lm routes a bailing_hybrid config with another class than
    BailingMoeV3ForCausalLM to its Ling-2.5 module, which refuses it."""
    from mlx_lm.utils import load_model

    with pytest.raises(TypeError, match="group_norm_size"):
        load_model(hybrid_case(CASE))


def test_prefill_equals_cached_decode(converted):
    """Across a 64-step chunk boundary; MLA decode attends in latent space."""
    ids = random_ids(256, 72, batch=2, seed=4)
    prefill_equals_decode(converted, ids, prefill=66)
    prefill_equals_decode(converted, ids[:, :10], prefill=1)


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


# --- unseen configurations, built and run by transformers ----------------------------------

BASE = dict(
    vocab_size=256, eos_token_id=1, pad_token_id=0, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, head_dim=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=1.7, layer_group_size=2, first_k_dense_replace=1,
    rope_theta=5000.0, num_nextn_predict_layers=0,
)


def _config(**over):
    from transformers import BailingHybridConfig

    return BailingHybridConfig(**{**BASE, **over})


def test_unseen_mla_first_qlora_bias_unbounded_gate_150_tokens(tmp_path):
    """MLA first, two dense layers, a query LoRA and MLA biases, Kimi's
    unbounded forget gate (kda_safe_gate false), one expert group, two shared
    experts, 150 tokens (three delta-rule chunks, the last partial). mlx-lm's
    Ling-3 has none of these options: inspect says so."""
    from transformers import BailingHybridForCausalLM

    cfg = _config(layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
                  mlp_layer_types=["dense", "dense", "sparse", "sparse"], q_lora_rank=24, attention_bias=True,
                  kda_safe_gate=False, n_group=1, topk_group=1, num_shared_experts=2)
    ids = random_ids(256, 150, batch=1, seed=2)
    src, ref = transformers_case(tmp_path, cfg, BailingHybridForCausalLM, ids, seed=2)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["attention", "kda", "kda", "attention"]
    got = np.array(model(mx.array(ids)))
    assert_logits_close(got, ref)
    prefill_equals_decode(model, ids[:, :70], prefill=66)
    written = json.loads((out / "config.json").read_text())
    verdict = lookup(written).mlx_lm_support(written)
    assert verdict.status == "cannot open" and "kda_safe_gate" in verdict.reason and "bias" in verdict.reason
    with pytest.raises(ValueError):
        mlx_lm_logits(out, ids)


def _released(c: dict, mtp: int = 1) -> dict:
    """transformers' config.json rewritten as the released Ling-3 one."""
    for key in ("linear_num_heads", "linear_conv_kernel_dim", "layer_types", "mlp_layer_types", "rope_parameters",
                "qk_head_dim"):
        c.pop(key, None)
    c["head_dim"] = c.pop("linear_head_dim")
    c["num_experts_per_tok"] = c.pop("num_experts_per_token")
    c["n_group"] = c.pop("num_expert_group")
    c["norm_topk_prob"] = c.pop("moe_renormalize")
    c["max_position_embeddings"] = c.pop("model_max_length")
    c.update(architectures=["BailingMoeV3ForCausalLM"], rope_theta=5000.0, num_nextn_predict_layers=mtp,
             moe_shared_expert_intermediate_size=c["moe_intermediate_size"], rope_interleave=True, no_kda_lora=True)
    return c


def test_released_layout_with_mtp_layers(tmp_path):
    """The released layout: head_dim is the KDA head size (16 here, MLA rope
    8), the schedule from layer_group_size and first_k_dense_replace, KDA's
    output projection named attention.o_proj, and one MTP layer's tensors
    after the decoder (dropped in the ledger). mlx-lm computes the converted
    folder, and the released-layout source too (its own sanitize)."""
    from safetensors.numpy import load_file, save_file
    from transformers import BailingHybridForCausalLM

    ids = random_ids(256, 40, batch=2, seed=3)
    src, ref = transformers_case(tmp_path, _config(), BailingHybridForCausalLM, ids, seed=3, rewrite=_released)
    w = load_file(str(src / "model.safetensors"))
    for i in (0, 2):  # KDA layers: the released name of the output projection
        w[f"model.layers.{i}.attention.o_proj.weight"] = w.pop(f"model.layers.{i}.attention.dense.weight")
    rng = np.random.default_rng(0)
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "attention.q_proj.weight"):
        w[f"model.layers.4.{name}"] = rng.standard_normal((8, 8)).astype(np.float32)  # MTP layer
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    dropped = [s.source for s in plan(resolve(str(src))).dropped]
    assert sorted(dropped) == sorted(f"model.layers.4.{n}" for n in ("eh_proj.weight", "enorm.weight",
                                                                    "hnorm.weight", "attention.q_proj.weight"))
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["kda", "attention", "kda", "attention"]
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MLP", "MoEBlock", "MoEBlock", "MoEBlock"]
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    assert_logits_close(mlx_lm_logits(out, ids), ref)
    assert_logits_close(mlx_lm_logits(src, ids), ref)


def test_transformers_in_memory_names(tmp_path):
    """A checkpoint carrying transformers' in-memory names (embed_tokens,
    self_attn, forget_gate, the fused conv1d and experts, MLA o_proj,
    e_score_correction_bias) converts to the same model."""
    from safetensors.torch import save_file
    from transformers import BailingHybridForCausalLM

    ids = random_ids(256, 20, batch=2, seed=6)
    src, ref = transformers_case(tmp_path, _config(), BailingHybridForCausalLM, ids, seed=6)
    model = BailingHybridForCausalLM.from_pretrained(src).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.self_attn.conv1d.weight" in state and "model.layers.1.mlp.experts.gate_up_proj" in state
    (src / "model.safetensors").unlink()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), ref)


def test_tail_layers_after_the_last_group(tmp_path):
    """5 layers with layer_group_size 2 and no layer_types: transformers makes
    the tail layer KDA, mlx-lm MLA — its loader refuses the weights, and
    inspect says so."""
    from transformers import BailingHybridForCausalLM

    ids = random_ids(256, 16, batch=1, seed=8)
    cfg = _config(num_hidden_layers=5)

    def no_types(c):
        c.pop("layer_types")
        return c

    src, ref = transformers_case(tmp_path, cfg, BailingHybridForCausalLM, ids, seed=8, rewrite=no_types)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["kda", "attention", "kda", "attention", "kda"]
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    written = json.loads((out / "config.json").read_text())
    verdict = lookup(written).mlx_lm_support(written)
    assert verdict.status == "cannot open" and "layer_types" in verdict.reason
    with pytest.raises(ValueError, match="parameters not in model"):
        mlx_lm_logits(out, ids)


def test_config_errors():
    base = json.loads((hybrid_case(CASE) / "config.json").read_text())

    def refused(match, **over):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**base, **over})

    refused("layer_types", layer_types=["linear_attention"] * 3)
    refused("mlp_layer_types", mlp_layer_types=["dense", "moe", "sparse", "sparse"])
    refused("rope_interleave", rope_interleave=False)
    refused("no_kda_lora", no_kda_lora=False)
    refused("moe_shared_expert_intermediate_size", moe_shared_expert_intermediate_size=48)
    refused("rope type 'yarn'", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    refused("n_group", num_expert_group=3)
    refused("topk_group", topk_group=4)
    # released meaning of head_dim / heads when the linear_* keys are absent
    cfg = normalize_config({k: v for k, v in base.items() if k not in ("linear_head_dim", "linear_num_heads")})
    assert cfg["linear_head_dim"] == 8 and cfg["linear_num_heads"] == 4


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, tokens=64, seed=2)
    for name, r in reports.items():
        print(name, r["verdict"], {k: r["metrics"]["overall"].get(k) for k in ("kl_mean", "top1_agreement")})
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name in ("model.layers.0.attention.A_log", "model.layers.0.attention.dt_bias",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias",
                 "model.layers.1.attention.kv_b_proj.weight"):
        assert w[name].dtype == mx.float32, name
    assert "model.layers.0.attention.q_proj.scales" in w and "model.layers.1.mlp.switch_mlp.gate_proj.scales" in w
    # mlx-lm opens the 4-bit folder (kv_b_proj kept float) and computes what hybridconv computes
    ids = random_ids(256, 12, batch=1, seed=1)
    ours = np.array(hybridconv.load(tmp_path / "q4")(mx.array(ids)))
    assert np.abs(mlx_lm_logits(tmp_path / "q4", ids) - ours).max() < 1e-3
