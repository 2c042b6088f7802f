"""Zamba2: the oracle case, unseen configurations built with transformers
(several shared blocks cycled over the hybrid layers, attention adapters,
RoPE, grouped KV, the published layout, tied copies of the shared block in the
checkpoint), prefill = cached decode, bf16 / 4-bit verify. mlx-lm has no
Zamba2 (checked)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.zamba2 import normalize_config, rules
from hybridconv.errors import ConfigError

from .arch_checks import convert_matches, oracle_case, prefill_equals_decode, transformers_case, verify_bf16_and_4bit
from .conftest import hybrid_case, random_ids

CASE = "zamba2-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_shared_block_once_and_decode(oracle):
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
    # one copy of the shared block; the per-use adapters moved to the layers using them
    assert not any("shared_transformer" in n for n in names)
    assert "model.shared_blocks.0.self_attn.q_proj.weight" in names
    assert {"model.layers.1.gate_up_adapter.0.weight", "model.layers.3.gate_up_adapter.1.weight"} <= names
    assert model.block_kinds() == ["mamba", "hybrid", "mamba", "hybrid"]
    prefill_equals_decode(model, ids, prefill=10)


def test_mlx_lm_has_no_zamba2():
    """mlx-lm resolves a model type to ``mlx_lm.models.<model_type>``; there is none
    for zamba2, so ``mlx_lm.utils.load_model`` refuses the output."""
    import importlib.util

    assert importlib.util.find_spec("mlx_lm") is not None
    assert importlib.util.find_spec("mlx_lm.models.zamba2") is None


def _config(**over):
    from transformers import Zamba2Config

    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        n_mamba_heads=8, mamba_d_state=8, mamba_ngroups=1, chunk_size=8, adapter_rank=8, num_mem_blocks=1,
        layers_block_type=["hybrid", "mamba", "hybrid", "hybrid", "mamba", "hybrid", "hybrid"],
    )
    kw.update(over)
    return Zamba2Config(**kw)


def _published(cfg: dict) -> dict:
    """As Zyphra's checkpoints state it: 'mamba' layers, top-level rope_theta."""
    cfg = dict(cfg)
    cfg["layers_block_type"] = ["mamba" if k == "linear_attention" else k for k in cfg["layers_block_type"]]
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["transformers_version"] = "4.48.0"
    return cfg


UNSEEN = {
    # two shared blocks cycled over five hybrid layers, q/k/v adapters, RoPE, 2 B/C groups
    "two-blocks-adapters-rope": dict(num_mem_blocks=2, use_shared_attention_adapter=True, use_mem_rope=True,
                                     mamba_ngroups=2),
    # three blocks, grouped KV heads, tanh GELU
    "three-blocks-gqa": dict(num_mem_blocks=3, num_key_value_heads=2, hidden_act="gelu_pytorch_tanh"),
    # published layout; untied head (transformers then ties no block either), biases
    "published-untied-bias": dict(num_mem_blocks=2, tie_word_embeddings=False, add_bias_linear=True,
                                  use_shared_attention_adapter=True),
}


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    from transformers import Zamba2ForCausalLM

    ids = random_ids(256, 19, batch=2, seed=2)
    rewrite = _published if name.startswith("published") else None
    src, ref = transformers_case(tmp_path, _config(**UNSEEN[name]), Zamba2ForCausalLM, ids, seed=3, rewrite=rewrite)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    if name == "two-blocks-adapters-rope":
        prefill_equals_decode(model, ids, prefill=7)


def test_tied_copies_in_checkpoint_are_dropped(tmp_path):
    """A checkpoint that stores the shared block again under each later caller
    (transformers ties them at load) converts to the same model."""
    from safetensors.numpy import load_file, save_file
    from transformers import Zamba2ForCausalLM

    ids = random_ids(256, 13, seed=5)
    src, ref = transformers_case(tmp_path, _config(num_mem_blocks=2), Zamba2ForCausalLM, ids, seed=4)
    tensors = load_file(str(src / "model.safetensors"))
    hyb = [0, 2, 3, 5, 6]
    for j, layer in enumerate(hyb[2:], start=2):
        first = hyb[j % 2]
        for name, value in list(tensors.items()):
            prefix = f"model.layers.{first}.shared_transformer."
            if name.startswith(prefix):
                tensors[f"model.layers.{layer}.shared_transformer." + name[len(prefix):]] = value
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert_matches(src, tmp_path / "out", ids, ref)
    cfg = normalize_config(json.loads((src / "config.json").read_text()))
    assert sum(r.name == "drop" and "tied copy" in r.reason for r in rules(cfg)) == 3


def test_bf16_and_4bit_verify(tmp_path):
    """Both pass. (The tiny random model's output is nearly flat — reference
    perplexity ~240 of a 256-token vocabulary — so the top-1 gates count only
    the decisive tokens; measured at 4 bits: KL mean 0.008, all-token top-1 0.58.)"""
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert [b["kind"] for b in reports["bf16"]["blocks"]] == ["mamba", "hybrid", "mamba", "hybrid"]
    assert reports["q4"]["model"]["precision"] == "4bit"


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"layers_block_type": ["mamba", "hybrid"]}, "list of 4"),
        ({"layers_block_type": ["mamba", "attention", "mamba", "hybrid"]}, "expected one of"),
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
        ({"n_mamba_heads": 7}, "n_mamba_heads"),
        ({"use_shared_attention_adapter": True, "num_key_value_heads": 2}, "use_shared_attention_adapter"),
        ({"layers_block_type": None, "layer_types": None}, "layers_block_type"),
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
    assert once["layers_block_type"] == ["mamba", "hybrid", "mamba", "hybrid"]
    assert normalize_config(json.loads(json.dumps(once))) == once
