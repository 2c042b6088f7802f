"""GLM-5.3-Flash (``glm5_next``: KDA + DSA-indexed NoPE MLA, mHC streams,
clamped-SwiGLU MoE), its language model out of the multimodal wrapper: the
wave3 oracle case (vision tower dropped with its reason), prefill and cached
decode each equal to transformers' own (which differ from each other where the
fixture's 2-head indexer scores tie: reproduced, not hidden), unseen
configurations built with transformers (selections shared between layers,
run block by block as verify does; Kimi's unbounded forget gate; groups; two
shared experts; pools of 2; attention biases; 3 streams; a tight SwiGLU clamp;
no tail pool; 150 tokens), the older config spellings and the flat text-only
layout, config errors, bf16 / 4-bit verify, and mlx-lm (no such model)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.converters import lookup
from hybridconv.converters.glm5_next import normalize_config
from hybridconv.errors import ConfigError
from hybridconv.verify.onepass import own_block_errors

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_case,
    oracle_matches,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import load_builtin, assert_logits_close, decode_logits, hybrid_case, oracle_logits, random_ids

CASE = "wave3/glm5_next-tiny"
KINDS = ["kda", "kda", "kda", "indexed_attention"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_case(tmp_path_factory, CASE)


def test_oracle_case_matches(converted):
    w = oracle_matches(converted, CASE, KINDS)
    assert not any(k.startswith("model.visual") or "language_model" in k for k in w)
    assert w["model.layers.0.attn_hc.fn"].shape == (8, 128) and w["model.layers.0.attn_hc.base"].dtype == mx.float32
    assert w["model.layers.0.self_attn.q_conv1d.weight"].shape == (64, 4, 1)
    assert w["model.layers.1.mlp.switch_mlp.gate_proj.weight"].shape == (4, 32, 64)
    assert "model.layers.3.self_attn.indexer.index_kpool_compress_ape" in w
    dropped = plan(resolve(str(hybrid_case(CASE)))).dropped
    assert dropped and all(s.source.startswith("model.visual.") and "vision tower" in s.dropped_because
                           for s in dropped)
    written = json.loads((converted / "config.json").read_text())
    assert written["model_type"] == "glm5_next" and "text_config" not in written and "vision_config" not in written
    assert written["layer_types"][3] == "indexed_attention" and written["hidden_size"] == 64


def test_prefill_and_decode_each_equal_transformers(converted):
    """hybridconv's prefill matches transformers' prefill and its cached decode
    transformers' cached decode, both to 1e-5. They differ from each other at 2
    of the 32 positions (11 and 27 by 0.51 and 0.41 in a logit; position 27 is
    among the steps here): there the 2-head indexer's scores are
    exactly 0 for several pools (ties) and torch.topk picks among them by its
    row, which in a prefill also holds the pools after the query (at float32
    min) and in a decode step does not."""
    import torch
    from transformers import Glm5NextForConditionalGeneration

    ids, ref = oracle_logits(hybrid_case(CASE))
    model = hybridconv.load(converted)
    full = np.array(model(mx.array(ids)))
    P = 22  # a cached prefill, then 10 steps (position 27 ties)
    ours = decode_logits(model, ids, P)
    tm = Glm5NextForConditionalGeneration.from_pretrained(hybrid_case(CASE), dtype=torch.float32).eval()
    tid = torch.tensor(ids).long()
    with torch.no_grad():
        out = tm(tid[:, :P], use_cache=True)
        cache, rows = out.cache, [out.logits]
        for t in range(P, ids.shape[1]):
            out = tm(tid[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            rows.append(out.logits)
    theirs = torch.cat(rows, 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(full - ref).max() < 1e-5
    differ = np.abs(theirs - ref).max(-1)[0] > 1e-3
    assert np.flatnonzero(differ).tolist() == [27]
    assert (np.abs(ours - full).max(-1)[0] > 1e-3).tolist() == differ.tolist()


def test_reconvert_is_noop(converted, tmp_path):
    assert_reconvert_is_noop(converted, tmp_path)


def test_mlx_lm_has_no_such_model(converted):

    cfg = json.loads((converted / "config.json").read_text())
    assert lookup(cfg).mlx_lm_support(cfg).status == "cannot open"
    with pytest.raises(ValueError, match="not supported"):
        load_builtin(converted)


# --- unseen configurations, built and run by transformers ----------------------------------


def _parts() -> tuple[dict, dict, dict]:
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    text, vision = dict(raw["text_config"]), dict(raw["vision_config"])
    text.pop("model_type")
    vision.pop("model_type")
    return text, vision, {k: v for k, v in raw.items() if k.endswith("token_id")}


def _build(tmp_path, ids, seed, rewrite=None, **over):
    from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

    text, vision, tokens = _parts()
    cfg = Glm5NextConfig(text_config={**text, **over}, vision_config=vision, **tokens)
    return transformers_case(tmp_path, cfg, Glm5NextForConditionalGeneration, ids, seed=seed, rewrite=rewrite)


def test_unseen_shared_selection_groups_gate_150_tokens(tmp_path):
    """Two indexed layers in a row twice, the second of each reusing the first's
    selection; Kimi's unbounded forget gate; 2 expert groups, 2 shared experts;
    pools of 2, top-4; 16 indexer heads (no exact ties); attention biases; 3
    streams, 5 Sinkhorn iterations; a SwiGLU clamp of 0.5; 150 tokens (three
    KDA chunks). Prefill = cached decode, and verify's block-by-block run (each
    block on a prefix, then token by token, before the next block) reproduces
    the model's own block outputs."""
    ids = random_ids(250, 150, batch=2, seed=3)
    src, ref = _build(
        tmp_path, ids, 3, num_hidden_layers=6,
        layer_types=["linear_attention", "indexed_attention", "indexed_attention"] * 2,
        indexer_types=["full", "full", "shared"] * 2, mlp_layer_types=["dense", "sparse", "sparse"] * 2,
        linear_lower_bound=None, n_group=2, topk_group=1, n_shared_experts=2, index_kpool=2, index_topk=4,
        index_n_heads=16, attention_bias=True, hc_mult=3, swiglu_limit=0.5, hc_sinkhorn_iters=5)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["kda", "indexed_attention", "indexed_attention"] * 2
    assert [layer.shared for layer in model.layers] == [False, False, True] * 2
    got = np.array(model(mx.array(ids)))
    assert_logits_close(got, ref)
    prefill_equals_decode(model, ids[:, :70], prefill=66)
    seq = ids[0, :24]
    hidden: list = []
    model(mx.array(seq[None]), hidden_states=hidden)
    kept = [np.array(h[0]) for h in hidden]
    sq = own_block_errors(model, [seq], 5, lambda s, b: kept[b], [mx.float32] * len(kept))
    assert sq.max() < 1e-8
    shared = model.layers[2]
    with pytest.raises(ValueError, match="run layer 1"):
        model.call_layer(shared, mx.zeros((1, 3, 192)), None, mx.zeros((1, 3, 192)))


def test_unseen_no_tail_pool(tmp_path):
    """index_kpool_always_select_tail false: the first index_kpool - 1 queries
    select nothing and get a zero attention output, as in torch's SDPA."""
    ids = random_ids(250, 20, batch=1, seed=4)
    src, ref = _build(tmp_path, ids, 4, index_kpool_always_select_tail=False, index_n_heads=16)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), ref)


def _older(c: dict) -> dict:
    """transformers' config.json rewritten in the older spellings GLM-5.3-Flash's config accepts."""
    t = c["text_config"]
    t["linear_attn_config"] = {"head_dim": t.pop("linear_head_dim"), "num_heads": t.pop("linear_num_heads"),
                               "short_conv_kernel_size": t.pop("linear_conv_kernel_dim"),
                               "gate_lower_bound": t.pop("linear_lower_bound")}
    t["index_topk_pattern"] = "".join("F" if x == "full" else "S" for x in t.pop("indexer_types"))
    t["layer_types"] = ["full_attention" if x == "indexed_attention" else x for x in t["layer_types"]]
    t["num_local_experts"] = t.pop("n_routed_experts")
    return c


def _flat(c: dict) -> dict:
    """The flat (text-only) layout: the text fields at the top level."""
    t = c.pop("text_config")
    c.pop("vision_config")
    t.pop("model_type")
    return {**c, **t}


@pytest.mark.parametrize("rewrite", [_older, _flat], ids=["older-spellings", "flat"])
def test_config_layouts(tmp_path, rewrite):
    ids = random_ids(250, 24, batch=1, seed=6)
    src, ref = _build(tmp_path, ids, 6, rewrite=rewrite, num_hidden_layers=3,
                      layer_types=["linear_attention", "indexed_attention", "indexed_attention"],
                      indexer_types=["full", "full", "shared"], mlp_layer_types=["dense", "sparse", "sparse"],
                      linear_conv_kernel_dim=3, index_n_heads=8)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert [layer.shared for layer in model.layers] == [False, False, True]
    assert_logits_close(np.array(model(mx.array(ids))), ref)


def test_config_errors():
    base = json.loads((hybrid_case(CASE) / "config.json").read_text())

    def refused(match, **over):
        with pytest.raises(ConfigError, match=match):
            normalize_config({**base, "text_config": {**base["text_config"], **over}})

    refused("qk_rope_head_dim", qk_rope_head_dim=8)
    refused("num_key_value_heads", num_key_value_heads=2)
    refused("q_lora_rank", q_lora_rank=None)
    refused("index_topk", index_topk=10)
    refused("reuses the DSA selection", indexer_types=["full", "full", "full", "shared"])
    refused("layer_types", layer_types=["linear_attention", "mamba", "linear_attention", "indexed_attention"])
    refused("n_group", n_group=3)
    refused("linear_lower_bound", linear_lower_bound=2.0)


def test_bf16_and_4bit_verify(tmp_path):
    """Passes with the default gates. bf16's mean KL (2e-3) is higher than for
    the other delta-rule models: the bf16 weights move near-tied indexer scores
    across the top-k boundary and the fixture's decode steps meet transformers'
    prefill/decode tie difference (test above)."""
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, tokens=64, seed=2)
    for name, r in reports.items():
        print(name, r["verdict"], {k: r["metrics"]["overall"].get(k) for k in ("kl_mean", "top1_agreement")})
        assert r["blocks"] and all(b.get("relative_error") is not None for b in r["blocks"])
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.A_log", "model.layers.1.mlp.gate.weight", "model.layers.0.attn_hc.base",
                 "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert w[name].dtype == mx.float32, name
    assert "model.layers.0.self_attn.q_proj.scales" in w and "model.layers.3.self_attn.indexer.wk.weight" in w


def test_transformers_in_memory_names(tmp_path):
    """A checkpoint carrying transformers' in-memory names (the fused KDA
    ``conv1d``, ``forget_gate.*``, fused experts, ``attn_hc.fn``) converts to
    the same model."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import Glm5NextForConditionalGeneration

    src = tmp_path / "src"
    shutil.copytree(hybrid_case(CASE), src)
    model = Glm5NextForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.language_model.layers.0.self_attn.conv1d.weight" in state
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in state
    (src / "model.safetensors").chmod(0o644)
    (src / "model.safetensors").unlink()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    ids, ref = oracle_logits(hybrid_case(CASE))
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), ref)
