"""Zamba (v1): the oracle case (shared block stored once), unseen configurations
built with transformers (untied head and blocks, grouped KV heads, more Mamba
heads, explicit dt rank, biases, the tanh GELU; the published layout without
``layers_block_type`` and with tied copies of the shared block in the
checkpoint), prefill = cached decode, bf16 / 4-bit verify. mlx-lm has no Zamba
(checked)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.zamba import default_schedule, normalize_config, rules
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_matches,
    oracle_case,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import hybrid_case, random_ids

CASE = "wave3/zamba-tiny"
KINDS = ["mamba", "hybrid", "mamba", "hybrid"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_shared_block_once_and_decode(oracle, tmp_path):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == KINDS
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mamba.dt_proj_bias").dtype.name == "float32"
    assert not any("shared_transf" in n for n in names)
    assert "model.shared_blocks.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("model.shared_blocks.1.") for n in names)
    assert {"model.layers.1.linear.weight", "model.layers.3.linear.weight"} <= names
    prefill_equals_decode(model, ids, prefill=7)
    assert_reconvert_is_noop(out, tmp_path)


def test_mlx_lm_has_no_zamba():
    import importlib.util

    assert importlib.util.find_spec("mlx_lm") is not None
    assert importlib.util.find_spec("mlx_lm.models.zamba") is None


def _config(**over):
    from transformers import ZambaConfig

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=4, n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=4,
              layers_block_type=["hybrid", "linear_attention", "hybrid", "hybrid", "linear_attention", "hybrid"])
    kw.update(over)
    return ZambaConfig(**kw)


def _published(cfg: dict) -> dict:
    """As transformers 4 wrote Zamba configs: no layer list (derived from the
    attention period and offset), an "auto" dt rank, no derived sizes."""
    cfg = dict(cfg)
    for key in ("layers_block_type", "attention_hidden_size", "attention_head_dim"):
        cfg.pop(key)
    cfg.update(mamba_dt_rank="auto", transformers_version="4.46.0")
    return cfg


UNSEEN = {
    # untied head: transformers then ties no block either; grouped KV, 4 Mamba heads, biases, tanh GELU
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=2, n_mamba_heads=4, mamba_dt_rank=6,
                       mamba_proj_bias=True, mamba_conv_bias=False, hidden_act="gelu_pytorch_tanh"),
    # published layout: the schedule from attn_layer_period 2 / offset 1, dt rank "auto" (= 4)
    "published": dict(layers_block_type=None, num_hidden_layers=7, attn_layer_period=2, attn_layer_offset=1),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import ZambaForCausalLM

    ids = random_ids(256, 19, batch=2, seed=8)
    rewrite = _published if name == "published" else None
    src, ref = transformers_case(tmp_path, _config(**UNSEEN[name]), ZambaForCausalLM, ids, seed=9, rewrite=rewrite)
    if name == "published":
        # a checkpoint that also stores the tied block under each later caller
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(src / "model.safetensors"))
        first, later = 2, [4, 6]  # default_schedule(7, 2, 1): hybrid at 2, 4, 6
        assert default_schedule(7, 2, 1) == ["mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"]
        for name_, value in list(tensors.items()):
            prefix = f"model.layers.{first}.shared_transf."
            if name_.startswith(prefix):
                for layer in later:
                    tensors[f"model.layers.{layer}.shared_transf." + name_[len(prefix):]] = value
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        cfg = normalize_config(json.loads((src / "config.json").read_text()))
        assert sum(r.name == "drop" and "tied copy" in r.reason for r in rules(cfg)) == 2
    model = convert_matches(src, tmp_path / "out", ids, ref)
    if name == "untied-gqa":
        assert len(model.model.shared_blocks) == 4  # one per hybrid layer
        prefill_equals_decode(model, ids, prefill=5)


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert [b["kind"] for b in reports["bf16"]["blocks"]] == KINDS
    print({k: r["metrics"]["overall"]["kl_mean"] for k, r in reports.items()})


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"layers_block_type": ["mamba", "hybrid"]}, "list of 4"),
        ({"layers_block_type": ["mamba", "attention", "mamba", "hybrid"]}, "expected one of"),
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
        ({"hidden_mamba_act": "relu"}, "hidden_mamba_act"),
        ({"n_mamba_heads": 3}, "n_mamba_heads"),
        ({"attention_hidden_size": 64}, "attention_hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"layers_block_type": None, "num_hidden_layers": 2}, "at least 3"),
    ],
)
def test_bad_configs(change, needle):
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_normalised_config_is_idempotent():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    once = normalize_config(raw)
    assert once["layers_block_type"] == KINDS and once["hybrid_layer_ids"] == [1, 3]
    assert normalize_config(json.loads(json.dumps(once))) == once
