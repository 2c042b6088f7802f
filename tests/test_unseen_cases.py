"""Cases the fixtures do not cover, built the same way: random weights in the
Hugging Face layout, logits from the same oracles (transformers for
RecurrentGemma, mlx-lm for PLaMo-2)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert

from .conftest import (
    assert_logits_close,
    plamo2_config,
    save_hf_plamo2,
    save_hf_recurrent_gemma,
    torch_logits,
)

RG_CASES = {
    # lru_width != hidden_size (mlx-lm cannot load this one)
    "lru-wider": dict(lru_width=96),
    # hidden 48: sqrt(48) is not a bfloat16 number, so the embedding scale rounding shows
    "hidden48-gqa": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, lru_width=48),
    # attention first, 5 layers over a 2-entry schedule, no soft cap on 0 layers
    "attn-first": dict(num_hidden_layers=5, block_types=["attention", "recurrent"],
                       attention_window_size=8),
}


@pytest.mark.parametrize("name", sorted(RG_CASES))
def test_recurrent_gemma_unseen(name, tmp_path):
    src = tmp_path / "src"
    ref_model = save_hf_recurrent_gemma(src, seed=3, **RG_CASES[name])
    ids = np.random.default_rng(0).integers(3, 320, size=(2, 29)).astype(np.int32)
    ref = torch_logits(ref_model, ids)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    got = hybridconv.load(out)(mx.array(ids))
    assert_logits_close(np.array(got), ref)


PLAMO_CASES = {
    "step4-untied": dict(mamba_step=4, num_hidden_layers=6, tie_word_embeddings=False),
    # several SSD chunks: the state must be carried across chunk boundaries
    "small-chunks": dict(mamba_chunk_size=8, mamba_d_state=8, mamba_num_heads=2,
                         hidden_size_per_head=32, num_attention_heads=2, num_key_value_heads=1),
    "wide-dt": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                    hidden_size_per_head=16, mamba_num_heads=8, intermediate_size=64),
}


@pytest.mark.parametrize("name", sorted(PLAMO_CASES))
def test_plamo2_unseen(name, tmp_path):
    src = tmp_path / "src"
    ref_model = save_hf_plamo2(src, plamo2_config(**PLAMO_CASES[name]), seed=5)
    ids = mx.array(np.random.default_rng(1).integers(3, 320, size=(2, 37)).astype(np.int32))
    ref = np.array(ref_model(ids))
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    assert_logits_close(np.array(hybridconv.load(out)(ids)), ref)


def test_plamo2_short_stack_schedule(tmp_path):
    """num_hidden_layers <= mamba_step // 2: the last layer is attention (mlx-lm's
    cache indexing crashes here; hybridconv converts and runs it)."""
    from hybridconv.models.plamo2 import ModelArgs, layer_schedule

    assert layer_schedule(ModelArgs(num_hidden_layers=2, mamba_step=4)) == ["mamba", "attention"]
    assert layer_schedule(ModelArgs(num_hidden_layers=1, mamba_step=4)) == ["attention"]
    assert layer_schedule(ModelArgs(num_hidden_layers=4, mamba_step=2)) == [
        "mamba", "attention", "mamba", "attention"]
    assert layer_schedule(ModelArgs(num_hidden_layers=3, mamba_enabled=False)) == ["attention"] * 3
    src = tmp_path / "src"
    save_hf_plamo2(src, plamo2_config(num_hidden_layers=2, mamba_step=4), seed=2)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["mamba", "attention"]
    ids = mx.array([[5, 6, 7, 8, 9]], dtype=mx.int32)
    assert model(ids).shape == (1, 5, 320)
