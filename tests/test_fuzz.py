"""Property tests (hypothesis): whatever the safetensors header, index file,
config.json or block_types, only hybridconv's own error types escape, and
nothing is written outside the output folder."""

from __future__ import annotations

import json
import os
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hybridconv
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
    @given(changes=st.dictionaries(st.sampled_from(KEYS[case]), json_values | st.integers(0, 10**7) | st.floats(-8, 8), min_size=1, max_size=3),
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
        else:
            # a conversion that succeeds is a model: it loads and computes finite logits
            logits = hybridconv.load(out)(mx.array([[1, 2, 3, 4, 5]]))
            assert np.isfinite(np.array(logits.astype(mx.float32))).all(), (changes, drop)
        # nothing but the source and (maybe) OUT in the parent: no strays, no partials
        assert {p.name for p in work.iterdir()} <= {"src", "out"}

    check()


# The numbers every architecture shares (config.check_plausible): any value either
# refuses to convert (exit 2, naming the key) or gives a model with finite logits.
NUMERIC = {
    "plamo2-tiny": ["rms_norm_eps", "rope_theta"],
    "recurrent_gemma-tiny": ["rms_norm_eps", "rope_theta", "partial_rotary_factor", "logits_soft_cap"],
}
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-8, 8) | st.sampled_from(
    [0, 0.0, -1, -5, 1, 4, 1e-30, 1e30, 0.5, 2])


@pytest.mark.parametrize("case", sorted(NUMERIC))
def test_shared_numbers_convert_only_to_working_models(fixtures_dir, tmp_path, case):
    base = json.loads((fixtures_dir / case / "config.json").read_text())

    @settings(SETTINGS, max_examples=_N or 40)
    @given(key=st.sampled_from(NUMERIC[case]), value=numbers)
    def check(key, value):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(fixtures_dir / case, work / "src")
        (work / "src" / "config.json").write_text(json.dumps({**base, key: value}))
        try:
            convert(str(work / "src"), work / "out")
        except HybridconvError as exc:
            assert exc.exit_code == 2 and f"'{key}'" in exc.message, exc.message
            return
        logits = hybridconv.load(work / "out")(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]))
        assert np.isfinite(np.array(logits.astype(mx.float32))).all(), (key, value)

    check()
