"""Nemotron-H: the oracle case (also through mlx-lm), unseen configurations
built with transformers (layer patterns, expert counts, top-k, group-limited
routing, latent experts, dense models, the published ``hybrid_override_pattern``
layout), prefill = cached decode, bf16 / 4-bit verify."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridconv.converters.nemotron_h import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    convert_matches,
    oracle_case,
    mlx_lm_agrees,
    mlx_lm_max_diff,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import hybrid_case, oracle_logits, random_ids, tolerance

CASE = "nemotron_h-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_decode_and_layout(oracle):
    _, out, model, ids, _ = oracle
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "ME*-" and cfg["num_hidden_layers"] == 4
    assert cfg["layers_block_type"] == ["linear_attention", "moe", "full_attention", "mlp"]
    assert model.block_kinds() == ["mamba", "moe", "attention", "mlp"]
    prefill_equals_decode(model, ids, prefill=9)


def test_mlx_lm_opens_and_matches(oracle):
    _, out, _, ids, ref = oracle
    assert mlx_lm_max_diff(out, ids, ref) <= tolerance(ref)


def _config(**over):
    from transformers import NemotronHConfig

    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, routed_scaling_factor=1.5,
        layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention", "mlp", "moe"],
    )
    kw.update(over)
    return NemotronHConfig(**kw)


def _published(cfg: dict) -> dict:
    """As NVIDIA's checkpoints state it: the pattern string, Mamba keys with the
    'mamba_' spellings, num_hidden_layers."""
    cfg = dict(cfg)
    kinds = cfg.pop("layers_block_type")
    cfg["hybrid_override_pattern"] = "".join({"linear_attention": "M", "full_attention": "*", "mlp": "-",
                                              "moe": "E"}[k] for k in kinds)
    cfg["num_hidden_layers"] = len(kinds)
    for new, old in (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"), ("chunk_size", "mamba_chunk_size"),
                     ("use_conv_bias", "mamba_conv_bias"), ("time_step_min", "mamba_dt_min")):
        cfg[old] = cfg.pop(new)
    cfg["transformers_version"] = "4.55.0"
    return cfg


UNSEEN = {
    # 8 experts, top-3 among the best of 2 groups, latent experts, no renormalisation,
    # 4 B/C groups, a time-step floor that binds
    "groups-latent-top3": (dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                moe_latent_size=32, norm_topk_prob=False, routed_scaling_factor=2.0,
                                n_groups=4, time_step_min=0.05, num_key_value_heads=1), None),
    # a dense model (no MoE) in the published layout, attention first, MLP biases
    "dense-published": (dict(layers_block_type=["full_attention", "linear_attention", "mlp", "linear_attention",
                                                "mlp"], mlp_bias=True, use_conv_bias=False, n_groups=1), _published),
    # MoE with published layout and top-1 routing (renormalised to 1, then scaled)
    "top1-published": (dict(num_experts_per_tok=1, n_routed_experts=6), _published),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import NemotronHForCausalLM

    over, rewrite = UNSEEN[name]
    ids = random_ids(256, 19, batch=2, seed=6)
    src, ref = transformers_case(tmp_path, _config(**over), NemotronHForCausalLM, ids, seed=11, rewrite=rewrite)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    if name == "groups-latent-top3":
        prefill_equals_decode(model, ids, prefill=5)
    if name == "top1-published":
        # mlx-lm renormalises top-k weights only when k > 1: with k = 1 it scales the
        # raw sigmoid score instead of 1 (measured, not a hybridconv difference)
        diff = mlx_lm_max_diff(tmp_path / "out", ids, ref)
        assert diff > 0.05, diff


def test_stacked_expert_source(tmp_path):
    """Experts saved already stacked (transformers' in-memory ``experts.up_proj``
    ``[E, I, H]`` layout) convert to the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(hybrid_case(CASE), src)
    tensors = load_file(str(src / "model.safetensors"))
    for proj in ("up_proj", "down_proj"):
        names = [f"backbone.layers.1.mixer.experts.{e}.{proj}.weight" for e in range(4)]
        tensors[f"backbone.layers.1.mixer.experts.{proj}"] = np.stack([tensors.pop(n) for n in names])
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ids, ref = oracle_logits(hybrid_case(CASE))
    convert_matches(src, tmp_path / "out", ids, ref)


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert reports["q4"]["model"]["precision"] == "4bit"
    # mlx-lm opens the 4-bit output and computes what hybridconv computes
    ids, _ = oracle_logits(hybrid_case(CASE))
    assert mlx_lm_agrees(tmp_path / "q4", ids) < 1e-4


def _raw():
    return json.loads((hybrid_case(CASE) / "config.json").read_text())


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"layers_block_type": ["linear_attention", "conv"]}, "expected one of"),
        ({"hybrid_override_pattern": "ME*X"}, "hybrid_override_pattern"),
        ({"hybrid_override_pattern": "MM*-"}, "disagree"),
        ({"layers_block_type": None}, "hybrid_override_pattern"),
        ({"num_hidden_layers": 5}, "num_hidden_layers"),
        ({"mamba_num_heads": 7}, "n_groups"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"mlp_hidden_act": "swiglu"}, "mlp_hidden_act"),
    ],
)
def test_bad_configs(change, needle):
    raw = _raw()
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_published_spellings_and_idempotence():
    raw = _published(_raw())
    cfg = normalize_config(raw)
    assert cfg["hybrid_override_pattern"] == "ME*-" and cfg["n_groups"] == 2 and cfg["chunk_size"] == 8
    assert cfg["time_step_limit"] == [raw["mamba_dt_min"], None] and cfg["mamba_proj_bias"] is False
    assert normalize_config(json.loads(json.dumps(cfg))) == cfg
    assert normalize_config(_raw()) == cfg | {"transformers_version": "5.24.0"}
