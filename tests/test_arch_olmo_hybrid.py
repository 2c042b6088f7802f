"""OLMo-Hybrid (gated DeltaNet with negative eigenvalues + OLMo-3 attention):
the transformers oracle case, unseen configurations (other layer orders, NoPE,
β ∈ (0, 1), grouped value heads, the published config layout, several
delta-rule chunks and a ragged tail), prefill = cached decode, bf16 / 4-bit
verify, and mlx-lm on the same folders."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert

from .conftest import assert_logits_close, decode_logits, hybrid_case, oracle_logits, random_ids
from .test_arch_qwen3_next import _convert_unseen, mlx_lm_logits, verify_bf16_and_4bit

CASE = "olmo_hybrid-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("olmo_hybrid") / "f32"
    convert(str(hybrid_case(CASE)), out, dtype="float32")
    return out


def test_oracle_case_matches_hybridconv_and_mlx_lm(converted):
    ids, ref = oracle_logits(hybrid_case(CASE))
    model = hybridconv.load(converted)
    assert model.block_kinds() == ["delta", "delta", "delta", "attention"]
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    # transformers saves the fused conv as three equal thirds (64 rows each for
    # 48 + 48 + 96 channels); the written q/k/v kernels have the exact sizes,
    # so mlx-lm loads and computes the folder.
    w = mx.load(str(converted / "model.safetensors"))
    assert [w[f"model.layers.0.linear_attn.{p}_conv1d.weight"].shape[0] for p in "qkv"] == [48, 48, 96]
    assert_logits_close(mlx_lm_logits(converted, ids), ref)


def test_mlx_lm_cannot_read_the_source():
    from mlx_lm.utils import load_model

    with pytest.raises(ValueError) as err:
        load_model(hybrid_case(CASE))
    print(str(err.value)[:200])


def test_prefill_equals_cached_decode(converted):
    model = hybridconv.load(converted)
    ids = random_ids(256, 72, batch=2, seed=4)
    full = np.array(model(mx.array(ids)))
    assert_logits_close(decode_logits(model, ids, prefill=67), full)
    assert_logits_close(decode_logits(model, ids[:, :10], prefill=1), full[:, :10])


def test_reconvert_is_noop(converted, tmp_path):
    again = tmp_path / "again"
    convert(str(converted), again, dtype="float32")
    a, b = mx.load(str(converted / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]), name


def test_unseen_layer_order_nope_positive_beta(tmp_path):
    """Attention first, NoPE (no rope_theta, as the released checkpoints), β in
    (0, 1), two value heads per key head, 140 tokens (three chunks, ragged);
    decode continues the chunked prefill's state."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    cfg = OlmoHybridConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=8, linear_allow_neg_eigval=False, max_position_embeddings=512,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1,
    )
    cfg.rope_parameters = None  # NoPE: transformers builds no rotary embedding
    src, out, ids, ref = _convert_unseen(tmp_path, cfg, OlmoHybridForCausalLM, T=140, seed=2)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] is None
    model = hybridconv.load(out)
    assert model.block_kinds() == ["attention", "delta", "delta", "attention"]
    assert model.layers[0].self_attn.rope is None
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    assert_logits_close(decode_logits(model, ids[:1, :68], prefill=65), np.array(model(mx.array(ids[:1, :68]))))
    assert_logits_close(mlx_lm_logits(out, ids), ref)


def test_unseen_published_layout(tmp_path):
    """Top-level rope_theta, no layer_types (attention at i % 4 == 3), default
    head sizes; 6 layers."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    cfg = OlmoHybridConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        linear_num_key_heads=4, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )

    def published(c):
        c.pop("layer_types")
        for k in ("linear_key_head_dim", "linear_value_head_dim", "linear_num_value_heads", "num_key_value_heads"):
            c.pop(k)
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        return c

    src, out, ids, ref = _convert_unseen(tmp_path, cfg, OlmoHybridForCausalLM, T=40, seed=3, rewrite=published)
    model = hybridconv.load(out)
    assert model.block_kinds() == ["delta", "delta", "delta", "attention", "delta", "delta"]
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    assert_logits_close(mlx_lm_logits(out, ids), ref)


def test_bf16_and_4bit_verify(tmp_path):
    """bf16 and the default 4-bit quantization pass every gate, the block gate
    included. At 4 bits the *chained* block outputs drift past the 4-bit block
    gate (0.6) — measured 0.30, 0.50, 0.68, 0.94 over the four blocks: each
    block of this tiny random model adds more than the residual it receives,
    and the last block's post-norms rescale what it adds, so quantization noise
    compounds (8 bits: 16x smaller) — while each block run on the reference's
    input to it (own error) stays near 0.1-0.3: verify's second stage tells
    this accumulated noise from a wrong block (see the broken-block test
    below)."""
    reports, ref = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, with_reference=True)
    for name, r in reports.items():
        print(name, {k: r["metrics"]["overall"].get(k) for k in ("kl_mean", "top1_agreement", "top5_overlap")},
              [(round(b["relative_error"], 3), round(b.get("own_error", -1), 3)) for b in r["blocks"]])
    q4 = reports["q4"]
    chained = [b["relative_error"] for b in q4["blocks"]]
    own = [b["own_error"] for b in q4["blocks"]]
    assert max(chained) > 0.6 and max(own) < 0.45, q4["blocks"]  # the case the second stage exists for
    assert q4["first_divergent_block"] is None and "accumulated" in q4["block_note"]
    assert "own_error" not in reports["bf16"]["blocks"][0]  # under the gate: no second stage
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name in ("model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.q_conv1d.weight",
                 "model.layers.0.linear_attn.a_proj.weight", "model.layers.3.self_attn.q_norm.weight"):
        assert w[name].dtype == mx.float32, name
    assert "model.layers.0.linear_attn.g_proj.scales" in w

    # A wrong block among that noise: block 1's k conv kernel reversed along K
    # in the 4-bit folder. The KL gates still pass (the tiny model's logits are
    # near-uniform); the block gate fails on block 1's own error and names it.
    from hybridconv.verify.run import verify_folder

    broken = tmp_path / "q4-broken"
    shutil.copytree(tmp_path / "q4", broken)
    k = "model.layers.1.linear_attn.k_conv1d.weight"
    w[k] = w[k][:, ::-1, :]
    mx.save_safetensors(str(broken / "model.safetensors"), w, metadata={"format": "mlx"})
    report = verify_folder(broken, ref).report
    gates = {c["gate"]: c for c in report["checks"]}
    assert report["verdict"] == "fail" and not gates["max_block_error"]["passed"]
    assert gates["max_kl_mean"]["passed"], gates
    assert report["first_divergent_block"] == 1, report["blocks"]
    assert report["blocks"][1]["own_error"] > 0.6 > max(b["own_error"] for b in report["blocks"][2:])
