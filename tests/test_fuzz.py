"""Property tests (hypothesis): whatever the safetensors header, index file,
config.json or block_types, only hybridconv's own error types escape, and
nothing is written outside the output folder."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridconv.checkpoint import index_weights
from hybridconv.convert import convert
from hybridconv.converters.recurrent_gemma import parse_block_types
from hybridconv.errors import HybridconvError
from hybridconv.safetensors_io import read_header

# Derandomized so CI is repeatable; set HYBRIDCONV_FUZZ=N for a longer, random run.
_N = int(os.environ.get("HYBRIDCONV_FUZZ", "0"))
SETTINGS = settings(max_examples=_N or 60, derandomize=not _N, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F7", "", "bf16"]) | json_values,
        "shape": st.lists(st.integers(-3, 10**6), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-10, 10**7), max_size=3) | json_values,
    },
)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_read_header_arbitrary_bytes(tmp_path, raw):
    f = tmp_path / "x.safetensors"
    f.write_bytes(raw)
    try:
        read_header(f)
    except HybridconvError:
        pass


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5),
       data=st.binary(max_size=64), lie=st.integers(-5, 5))
def test_read_header_structured(tmp_path, header, data, lie):
    raw = json.dumps(header).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + data)
    try:
        tensors, _ = read_header(f)
    except HybridconvError:
        return
    size = f.stat().st_size
    for t in tensors.values():  # whatever is accepted is consistent
        assert 0 <= t.begin <= t.end <= size


@SETTINGS
@given(weight_map=st.dictionaries(st.text(max_size=20), st.text(max_size=30) | st.sampled_from(
    ["model.safetensors", "../model.safetensors", "/etc/passwd", "a/b.safetensors", "..", "."]), max_size=5)
    | json_values)
def test_index_files(fixtures_dir, tmp_path, weight_map):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(fixtures_dir / "plamo2-tiny" / "model.safetensors", folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        index_weights(folder)
    except HybridconvError:
        pass


@SETTINGS
@given(value=json_values | st.lists(st.sampled_from(["recurrent", "attention", "mlp", ""]), max_size=5))
def test_block_types(value):
    try:
        kinds = parse_block_types(value)
    except HybridconvError:
        return
    assert kinds and set(kinds) <= {"recurrent", "attention"}


KEYS = {
    "plamo2-tiny": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "hidden_size_per_head", "mamba_d_state", "mamba_d_conv", "mamba_num_heads", "mamba_step",
                    "mamba_chunk_size", "mamba_enabled", "intermediate_size", "vocab_size", "tie_word_embeddings",
                    "attention_window_size", "full_attention_idx", "rms_norm_eps", "model_type"],
    "recurrent_gemma-tiny": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "lru_width", "attention_window_size", "conv1d_width", "logits_soft_cap", "block_types",
                             "partial_rotary_factor", "rope_theta", "intermediate_size", "vocab_size",
                             "tie_word_embeddings", "hidden_activation", "model_type"],
}


@pytest.mark.parametrize("case", sorted(KEYS))
def test_config_mutations_convert(fixtures_dir, tmp_path, case):
    @SETTINGS
    @given(changes=st.dictionaries(st.sampled_from(KEYS[case]), json_values | st.integers(0, 10**7), min_size=1, max_size=3),
           drop=st.lists(st.sampled_from(KEYS[case]), max_size=2))
    def check(changes, drop):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        src = work / "src"
        shutil.copytree(fixtures_dir / case, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        for k in drop:
            cfg.pop(k, None)
        (src / "config.json").write_text(json.dumps(cfg))
        out = work / "out"
        try:
            convert(str(src), out)
        except HybridconvError:
            assert not out.exists()
        # nothing but the source and (maybe) OUT in the parent: no strays, no partials
        assert {p.name for p in work.iterdir()} <= {"src", "out"}

    check()
