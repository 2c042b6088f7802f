"""LFM2 and LFM2-MoE: the oracle cases, unseen configurations built with
transformers (layer orders, conv bias, untied heads, FFN width rules, dense-first
counts, routing options), the published config layout, prefill = cached decode,
bf16 / 4-bit through verify, and what mlx-lm makes of the outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.errors import ConfigError
from hybridconv.models.lfm2 import ff_dim

from .conftest import (
    assert_logits_close,
    decode_logits,
    hybrid_case,
    oracle_logits,
    random_ids,
    save_hf_transformers,
    torch_logits,
)

SMALL = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _mlx_lm(out: Path, ids: np.ndarray):
    """mlx-lm's logits for a converted folder, or the exception it raises."""
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    try:
        model = load_model(out)[0]
        return np.array(model(mx.array(ids)).astype(mx.float32))
    except Exception as exc:  # noqa: BLE001 - measured, asserted by the caller
        return exc


# --- oracle cases ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfm2")
    out = {}
    for case in ("lfm2-tiny", "lfm2_moe-tiny"):
        out[case] = root / case
        convert(str(hybrid_case(case)), out[case], dtype="float32")
    return out


@pytest.mark.parametrize("case", ["lfm2-tiny", "lfm2_moe-tiny"])
def test_oracle_case_through_hybridconv_and_mlx_lm(oracle, case):
    ids, want = oracle_logits(hybrid_case(case))
    model = hybridconv.load(oracle[case])
    assert model.block_kinds() == ["conv", "attention", "conv", "attention"]
    assert_logits_close(np.array(model(mx.array(ids))), want)
    # mlx-lm computes both correctly from our output (it cannot read the lfm2
    # fixture's own config: block_dim is missing)
    theirs = _mlx_lm(oracle[case], ids)
    assert_logits_close(theirs, want)
    cfg = json.loads((oracle[case] / "config.json").read_text())
    assert cfg["block_dim"] == 64 and cfg["full_attn_idxs"] == [1, 3]


@pytest.mark.parametrize("case", ["lfm2-tiny", "lfm2_moe-tiny"])
def test_prefill_equals_cached_decode(oracle, case):
    model = hybridconv.load(oracle[case])
    ids = random_ids(256, 21, batch=2, seed=4)
    full = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(decode_logits(model, ids, prefill=5), full, atol=2e-5, rtol=0)
    np.testing.assert_allclose(decode_logits(model, ids, prefill=1), full, atol=2e-5, rtol=0)


def test_converting_output_again_changes_nothing(oracle, tmp_path):
    for case, folder in oracle.items():
        again = tmp_path / case
        res = convert(str(folder), again, dtype="float32")
        assert not any(s.applied for s in res.plan.steps), case
        assert json.loads((again / "config.json").read_text()) == json.loads((folder / "config.json").read_text())


# --- unseen configurations ---------------------------------------------------------------------

LFM2_CASES = {
    # attention first, conv bias on (in_proj, conv, out_proj), untied head, one KV head,
    # a width rule that rounds: int(1.5·int(2·160/3)) = 159 -> 160
    "attn-first-bias-untied": dict(
        num_hidden_layers=5, layer_types=["full_attention", "conv", "conv", "full_attention", "conv"],
        conv_bias=True, tie_word_embeddings=False, num_key_value_heads=1, intermediate_size=160,
        block_multiple_of=32, block_ffn_dim_multiplier=1.5, conv_L_cache=4),
    # only convolutions; no auto-adjust: intermediate_size is the width
    "all-conv-no-adjust": dict(num_hidden_layers=3, layer_types=["conv"] * 3, intermediate_size=72,
                               block_auto_adjust_ff_dim=False),
}
LFM2_MOE_CASES = {
    # no dense layer, no expert bias, no renormalisation, scaling, k=3 of 6, untied, conv bias
    "all-moe-plain-sigmoid": dict(
        num_hidden_layers=3, layer_types=["full_attention", "conv", "conv"], num_dense_layers=0,
        num_experts=6, num_experts_per_tok=3, use_expert_bias=False, norm_topk_prob=False,
        routed_scaling_factor=2.0, tie_word_embeddings=False, conv_bias=True,
        intermediate_size=96, moe_intermediate_size=32),
    # two dense layers first, expert bias (set to random values), k=1
    "dense-first-2-bias-k1": dict(
        num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"], num_dense_layers=2,
        num_experts=4, num_experts_per_tok=1, use_expert_bias=True, intermediate_size=96,
        moe_intermediate_size=32),
    # every layer dense: an LFM2-MoE without experts
    "all-dense": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], num_dense_layers=2,
                      num_experts=4, num_experts_per_tok=2, intermediate_size=96, moe_intermediate_size=32),
}


def _build(kind: str, name: str, folder: Path):
    import torch
    from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM

    if kind == "lfm2":
        cfg = Lfm2Config(**{**SMALL, **LFM2_CASES[name]})
        model = save_hf_transformers(folder, cfg, Lfm2ForCausalLM, seed=7)
    else:
        cfg = Lfm2MoeConfig(**{**SMALL, **LFM2_MOE_CASES[name]})
        model = save_hf_transformers(folder, cfg, Lfm2MoeForCausalLM, seed=8)
        # expert_bias is a buffer (not perturbed by the helper): give it values
        # that change the expert choice, and save again
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "expert_bias"):
                layer.feed_forward.expert_bias.copy_(torch.randn(cfg.num_experts, generator=g) * 0.3)
        model.save_pretrained(folder)
    return model


UNSEEN = [("lfm2", n) for n in sorted(LFM2_CASES)] + [("lfm2_moe", n) for n in sorted(LFM2_MOE_CASES)]

# What mlx-lm (0.32) does with our output of each unseen case, measured:
# None = computes it correctly; otherwise the failure it raises.
MLX_LM = {
    "attn-first-bias-untied": "lm_head",  # its LFM2 always ties the head: refuses lm_head.weight
    "all-conv-no-adjust": "index",  # full_attn_idxs[0] of an empty list
    "all-moe-plain-sigmoid": "lm_head",
    "dense-first-2-bias-k1": None,
    "all-dense": None,
}


@pytest.mark.parametrize("kind,name", UNSEEN)
def test_unseen_configuration(kind, name, tmp_path):
    src = tmp_path / "src"
    ref_model = _build(kind, name, src)
    ids = random_ids(256, 19, batch=2, seed=3)
    ref = torch_logits(ref_model, ids)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    np.testing.assert_allclose(decode_logits(model, ids, prefill=7), np.array(model(mx.array(ids))), atol=2e-5, rtol=0)
    theirs = _mlx_lm(out, ids)
    if MLX_LM[name] is None:
        assert_logits_close(theirs, ref)
    else:
        assert isinstance(theirs, Exception) and MLX_LM[name] in str(theirs).lower(), theirs


def test_ffn_width_rule_matches_transformers():
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    for size, mult, multiple, auto in [(192, 1.0, 32, True), (160, 1.5, 32, True), (1000, 0.7, 256, True),
                                       (72, 1.0, 32, False)]:
        cfg = Lfm2Config(hidden_size=8, intermediate_size=size, block_ffn_dim_multiplier=mult,
                         block_multiple_of=multiple, block_auto_adjust_ff_dim=auto)
        assert ff_dim(size, auto, mult, multiple) == Lfm2MLP(cfg).w1.out_features
    # no multiplier: transformers' rule does not round (mlx-lm's does: 96)
    assert ff_dim(100, True, None, 32) == 66


# --- published config layout ----------------------------------------------------------------


def _published(raw: dict) -> dict:
    """A transformers-5 config rewritten into the layout of Liquid AI's published
    configs (transformers 4.54 era): full_attn_idxs instead of layer_types,
    block_dim, block_ff_dim instead of intermediate_size, tie_embedding, top-level
    rope_theta, the duplicate num_heads / block_norm_eps, and keys nothing reads."""
    cfg = {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters", "tie_word_embeddings")}
    cfg["full_attn_idxs"] = [i for i, t in enumerate(raw["layer_types"]) if t == "full_attention"]
    cfg["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    cfg["tie_embedding"] = raw["tie_word_embeddings"]
    cfg["block_dim"] = raw["hidden_size"]
    cfg["num_heads"] = raw["num_attention_heads"]
    cfg["block_norm_eps"] = raw["norm_eps"]
    cfg.update(block_use_swiglu=True, conv_dim=raw["hidden_size"], use_pos_enc=True)
    if raw["model_type"] == "lfm2":
        cfg["block_ff_dim"] = cfg.pop("intermediate_size")
    return cfg


@pytest.mark.parametrize("case", ["lfm2-tiny", "lfm2_moe-tiny"])
def test_published_config_layout(case, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hybrid_case(case), src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(_published(raw)))
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    ids, want = oracle_logits(hybrid_case(case))
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), want)
    assert_logits_close(_mlx_lm(out, ids), want)
    # the aliases alone (no num_attention_heads / norm_eps) are enough for hybridconv
    raw = json.loads((src / "config.json").read_text())
    del raw["num_attention_heads"], raw["norm_eps"]
    (src / "config.json").write_text(json.dumps(raw))
    convert(str(src), tmp_path / "out2", dtype="float32")
    assert_logits_close(np.array(hybridconv.load(tmp_path / "out2")(mx.array(ids))), want)


@pytest.mark.parametrize("edit,match", [
    (dict(layer_types=["conv", "mamba", "conv", "full_attention"]), "layer_types entry 'mamba'"),
    (dict(layer_types=["conv"]), "layer_types has 1 entries"),
    (dict(block_dim=32), "block_dim"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope type 'yarn'"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_configs_fail_plainly(edit, match, tmp_path):
    from hybridconv.convert import plan

    src = tmp_path / "src"
    shutil.copytree(hybrid_case("lfm2-tiny"), src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ConfigError, match=match):
        plan(resolve(str(src)))


def test_moe_bad_configs_fail_plainly(tmp_path):
    from hybridconv.convert import plan

    src = tmp_path / "src"
    shutil.copytree(hybrid_case("lfm2_moe-tiny"), src)
    raw = json.loads((src / "config.json").read_text())
    for edit, match in [(dict(num_experts_per_tok=5), "exceeds num_experts"),
                        (dict(num_dense_layers=9), "num_dense_layers"),
                        (dict(num_experts=3), r"experts\.3\.w1\.weight.*expert 3")]:
        (src / "config.json").write_text(json.dumps({**raw, **edit}))
        with pytest.raises(Exception, match=match):
            plan(resolve(str(src)))


# --- bf16 and 4-bit through verify -------------------------------------------------------------


@pytest.mark.parametrize("case", ["lfm2-tiny", "lfm2_moe-tiny"])
def test_bf16_and_4bit_verify(case, tmp_path):
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import build_inputs
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.run import verify_folder

    src = resolve(str(hybrid_case(case)))
    inputs = build_inputs(src.path, 256, random_tokens=40, num_sequences=2, seed=1)
    ref = compute_reference(src, inputs)
    assert ref.block_kinds == ["conv", "attention", "conv", "attention"]
    bf16 = tmp_path / "bf16"
    convert(str(src.path), bf16, dtype="bfloat16")
    report = verify_folder(bf16, ref).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    q4 = tmp_path / "q4"
    quantize(str(src.path), q4)
    report = verify_folder(q4, ref).report
    assert report["verdict"] == "pass", report["failure_reasons"]


FUZZ_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "conv_L_cache", "conv_bias", "layer_types", "full_attn_idxs", "block_multiple_of",
             "block_ffn_dim_multiplier", "block_auto_adjust_ff_dim", "norm_eps", "rope_parameters",
             "tie_word_embeddings", "vocab_size", "head_dim", "block_dim", "moe_intermediate_size", "num_experts",
             "num_experts_per_tok", "num_dense_layers", "use_expert_bias", "norm_topk_prob", "routed_scaling_factor"]
FUZZ_VALUES = [None, -1, 0, 1, "x", 10**7, [], True, 2.5, {"a": 1}, ["conv"], "<drop>"]


@pytest.mark.parametrize("case", ["lfm2-tiny", "lfm2_moe-tiny"])
def test_config_mutations_plan_or_fail_plainly(case, tmp_path):
    """Every key set to odd values (or removed): the plan succeeds or fails with a
    hybridconv error, never a crash."""
    from hybridconv.convert import plan
    from hybridconv.errors import HybridconvError

    src = tmp_path / "src"
    shutil.copytree(hybrid_case(case), src)
    raw = json.loads((src / "config.json").read_text())
    for key in FUZZ_KEYS:
        for value in FUZZ_VALUES:
            cfg = {k: v for k, v in raw.items() if not (k == key and value == "<drop>")}
            if value != "<drop>":
                cfg[key] = value
            (src / "config.json").write_text(json.dumps(cfg))
            try:
                plan(resolve(str(src)))
            except HybridconvError:
                pass
