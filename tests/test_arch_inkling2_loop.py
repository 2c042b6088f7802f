"""Inkling-2-Mini (looped Inkling-2): the oracle case (layers 2-3 run twice, message
gates), unseen configurations built with transformers (three passes, one pass,
a loop that ends the model, blocks of one layer), the original ``loop_config``
spelling, one block per layer run in the reference's order (each run with its
own cache: prefill = cached decode), bf16 / 4-bit verify, and mlx-lm (none)."""

from __future__ import annotations

import json

import pytest

from hybridconv.converters.inkling2_loop import normalize_config
from hybridconv.errors import ConfigError
from hybridconv.models.inkling2_loop import ModelArgs, unrolled

from .arch_checks import assert_reconvert_is_noop, convert_matches, oracle_case, prefill_equals_decode, verify_bf16_and_4bit
from .conftest import hybrid_case, random_ids, save_hf_transformers, torch_logits

CASE = "wave3/inkling2_loop-tiny"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return oracle_case(tmp_path_factory, CASE)


def test_oracle_case_runs_and_decode(oracle, tmp_path):
    import mlx.core as mx
    from safetensors import safe_open

    _, out, model, ids, _ = oracle
    # 6 layers, layers 2-3 run twice: 8 blocks, caches per run
    assert [r.run.layer for r in model.layers] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert len(model.make_cache()) == 8 and len(model.model.layers) == 6
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.message_input.kv_queries").get_dtype() == "F32"
    assert "model.layers.2.q_message_gate.down_proj.weight" in names
    assert "model.layers.3.mlp_message_gate.forget_gate_proj.weight" in names
    hidden: list = []
    model(mx.array(ids), hidden_states=hidden)
    assert [h.shape for h in hidden] == [(1, 24, 64)] * 8
    prefill_equals_decode(model, ids, prefill=3)
    assert_reconvert_is_noop(out, tmp_path)


def test_stream_slots_follow_the_schedule():
    """Slot counts of each run's input and output chain: what one run writes, the
    next reads (pre-loop state saved while another pass follows, the previous
    pass's state during passes >= 2)."""
    args = ModelArgs(num_hidden_layers=8, n_layers_per_attn_res_block=2, loop_layer_index_start=2,
                     loop_layer_index_end=6, loop_num_passes=3, layer_types=["hybrid"] * 8)
    runs = unrolled(args)
    assert [r.layer for r in runs] == [0, 1] + [2, 3, 4, 5] * 3 + [6, 7]
    for a, b in zip(runs, runs[1:]):
        # a run's current state: the saved one at a restart, plus one finished block at a boundary
        cur_out = (a.snap_in if a.restart else a.cur_in) + (1 if a.layer % 2 == 0 else 0)
        assert (cur_out, a.snap_out, a.prev_out) == (b.cur_in, b.snap_in, b.prev_in), (a, b)
    assert runs[-1].snap_out == runs[-1].prev_out == 0


def test_mlx_lm_has_no_inkling2_loop(oracle):
    import importlib.util

    assert importlib.util.find_spec("mlx_lm.models.inkling2_loop_text") is None


def _config(**over):
    from transformers import Inkling2LoopTextConfig

    kw = dict(vocab_size=256, unpadded_vocab_size=250, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
              swa_head_dim=16, sliding_window_size=6, d_rel=4, rel_extent=16, log_scaling_n_floor=8,
              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, route_scale=2.0,
              n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=2,
              loop_gate_rank=8, max_position_embeddings=256, eos_token_id=1,
              layer_types=["hybrid_sliding", "hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"])
    kw.update(over)
    return Inkling2LoopTextConfig(**kw)


UNSEEN = {
    # three passes over layers 2-3 with blocks of one layer (messages from two blocks)
    "three-passes-blocks1": dict(loop_num_passes=3, n_layers_per_attn_res_block=1),
    # one pass: plain Inkling-2 with message gates that never run
    "one-pass": dict(loop_num_passes=1),
    # the loop ends the model (no post layers), four loop layers, two passes
    "loop-at-end": dict(loop_layer_index_start=2, loop_layer_index_end=6, loop_num_passes=2),
}


def _build(tmp, config, seed, rewrite=None):
    from transformers import Inkling2LoopForCausalLM

    src = tmp / "src"
    model = save_hf_transformers(src, config, Inkling2LoopForCausalLM, seed=seed)
    ids = random_ids(256, 15, seed=seed)  # past the window of 6, small: every pass runs the loop again
    ref = torch_logits(model, ids)
    if rewrite is not None:
        path = src / "config.json"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
    return src, ids, ref


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen(name, tmp_path):
    src, ids, ref = _build(tmp_path, _config(**UNSEEN[name]), seed=3)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    prefill_equals_decode(model, ids, prefill=4)


def _loop_config(cfg: dict) -> dict:
    """The original configs' loop_config table instead of the loop_* keys."""
    cfg = dict(cfg)
    cfg["loop_config"] = {"core_start": cfg.pop("loop_layer_index_start"), "core_end": cfg.pop("loop_layer_index_end"),
                          "num_passes": cfg.pop("loop_num_passes"), "gate_rank": cfg.pop("loop_gate_rank")}
    return cfg


def test_loop_config_spelling(tmp_path):
    src, ids, ref = _build(tmp_path, _config(loop_num_passes=3), seed=5, rewrite=_loop_config)
    model = convert_matches(src, tmp_path / "out", ids, ref)
    assert len(model.layers) == 6 + 2 * 2


def test_bf16_and_4bit_verify(tmp_path):
    reports = verify_bf16_and_4bit(hybrid_case(CASE), tmp_path, sequences=1, decode_steps=4)
    assert len(reports["q4"]["blocks"]) == 8


@pytest.mark.parametrize("change,needle", [
    ({"loop_num_passes": 0}, "at least 1"),
    ({"loop_layer_index_start": 0}, "0 < start"),
    ({"loop_layer_index_end": 3}, "multiples"),
    ({"loop_layer_index_end": 8}, "num_hidden_layers"),
])
def test_bad_configs(change, needle):
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(raw)


def test_normalised_config_is_idempotent():
    raw = json.loads((hybrid_case(CASE) / "config.json").read_text())
    once = normalize_config(raw)
    assert normalize_config(json.loads(json.dumps(once))) == once
