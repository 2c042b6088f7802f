"""LFM3: the oracle case (short convs with kernel 7, proportional partial RoPE,
a sliding layer with window 8, sandwich norms, attention gate), unseen
configurations built with transformers (no sandwich norms / gate, biases, untied
head, other windows, RoPE variants, transformers' default schedule), the
layouts transformers also reads (``rms_norm_eps``, no ``rope_parameters``, the gate
under its in-memory name ``g_proj``), prefill = cached decode past the window,
bf16 / 4-bit verify, and mlx-lm (no LFM3 there)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.lfm3 import normalize_config
from hybridconv.errors import ConfigError

from .arch_checks import (
    assert_reconvert_is_noop,
    convert_matches,
    oracle_case,
    prefill_equals_decode,
    transformers_case,
    verify_bf16_and_4bit,
)
from .conftest import load_builtin, hybrid_case, random_ids

CASE = "wave3/lfm3-tiny"
KINDS = ["conv", "conv", "attention", "conv", "attention"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_layout_and_decode(oracle, tmp_path):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    assert model.block_kinds() == KINDS
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.conv.conv.weight").get_shape() == [64, 7, 1]
    assert "model.layers.2.self_attn.gate_proj.weight" in names and "lm_head.weight" not in names
    # 24 tokens, window 8: decoding crosses the window and the conv state
    prefill_equals_decode(model, ids, prefill=3)
    assert_reconvert_is_noop(out, tmp_path)


def test_mlx_lm_has_no_lfm3(oracle):
    """mlx-lm resolves ``mlx_lm.models.<model_type>``; there is no lfm3 module, so
    its loader refuses the output (measured)."""
    import importlib.util


    assert importlib.util.find_spec("mlx_lm.models.lfm3") is None
    with pytest.raises(ValueError, match="not supported"):
        load_builtin(oracle[1])


def _config(**over):
    from transformers import Lfm3Config

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, conv_L_cache=4, sliding_window=6,
              layer_types=["sliding_attention", "conv", "full_attention", "sliding_attention", "conv"],
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return Lfm3Config(**kw)


UNSEEN = {
    # LFM2-like layers (no sandwich norms, no gate), biases everywhere, untied head, one KV head
    "plain-bias-untied": dict(use_sandwich_norm=False, use_attention_gate=False, attention_bias=True,
                              conv_bias=True, tie_word_embeddings=False, num_key_value_heads=1),
    # other RoPE tables: proportional over a quarter of the head with a factor on the
    # full layers, proportional (whole head) on the sliding ones; head_dim 32
    "rope-variants": dict(head_dim=32, num_attention_heads=2, num_key_value_heads=1, rope_parameters={
        "full_attention": {"rope_type": "proportional", "rope_theta": 5e5, "partial_rotary_factor": 0.25,
                           "factor": 2.0},
        "sliding_attention": {"rope_type": "proportional", "rope_theta": 2e4, "partial_rotary_factor": 1.0}}),
    # transformers' default schedule for 7 layers (full at 2 and 6, sliding at 4), kernel 3
    "default-schedule": dict(num_hidden_layers=7, layer_types=None, conv_L_cache=3, sliding_window=4),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import Lfm3ForCausalLM

    ids = random_ids(256, 19, batch=2, seed=2)
    src, ref = transformers_case(tmp_path, _config(**UNSEEN[name]), Lfm3ForCausalLM, ids, seed=3)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    prefill_equals_decode(model, ids, prefill=4)


def _as_transformers_also_reads(cfg: dict) -> dict:
    """The other spellings transformers accepts: rms_norm_eps (its attribute_map
    alias), no rope_parameters and no layer_types (its defaults, which this case
    uses), a top-level rope_theta it ignores when rope_parameters is absent."""
    cfg = dict(cfg)
    cfg["rms_norm_eps"] = cfg.pop("norm_eps")
    del cfg["rope_parameters"], cfg["layer_types"]
    cfg["rope_theta"] = 12345.0
    return cfg


def test_other_layouts_and_gate_named_g_proj(tmp_path):
    from safetensors.numpy import load_file, save_file
    from transformers import Lfm3ForCausalLM

    ids = random_ids(256, 15, seed=6)
    config = _config(num_hidden_layers=6, layer_types=None, norm_eps=1e-4)
    src, ref = transformers_case(tmp_path, config, Lfm3ForCausalLM, ids, seed=5, rewrite=_as_transformers_also_reads)
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {k.replace(".self_attn.gate_proj.", ".self_attn.g_proj."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(path), metadata={"format": "pt"})
    model = convert_matches(src, tmp_path / "out", ids, ref)
    assert model.args.norm_eps == 1e-4
    assert model.args.rope_parameters["full_attention"]["rope_type"] == "proportional"


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert [b["kind"] for b in reports["q4"]["blocks"]] == KINDS


@pytest.mark.parametrize("change,needle", [
    ({"layer_types": ["conv", "mamba", "conv", "full_attention", "conv"]}, "layer_types entry 'mamba'"),
    ({"layer_types": ["conv"]}, "layer_types has 1 entries"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "not nested"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "'yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "sliding_attention"),
    ({"sliding_window": None}, "sliding_window is null"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_bad_configs(change, needle):
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_normalised_config_is_idempotent():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    once = normalize_config(raw)
    assert once["rope_parameters"]["full_attention"] == {
        "rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.5, "factor": 1.0}
    assert normalize_config(json.loads(json.dumps(once))) == once
