"""Implausible shared config values exit 2 naming the key (issue 15, item 8),
for every architecture: one check (config.check_plausible) that the registry
runs around each converter's normalisation, on the raw and the normalised
config. Before it, rms_norm_eps = -1 and PLaMo-2 rope_theta = -5 converted and
gave NaN logits, and partial_rotary_factor = 4 converted and failed at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hybridconv.config import check_plausible
from hybridconv.convert import convert
from hybridconv.converters import lookup
from hybridconv.errors import ConfigError

from .conftest import FIXTURES, HYBRIDS
from .test_new_user import hc

CASES = sorted(
    [p for p in FIXTURES.iterdir() if (p / "config.json").is_file()]
    + [p for p in HYBRIDS.iterdir() if (p / "config.json").is_file()]
) if FIXTURES.is_dir() else []


def _eps_key(cfg: dict) -> str:
    return next(k for k in cfg if k.endswith(("eps", "epsilon")))


def _copy(case: Path, dst: Path, **changes) -> Path:
    shutil.copytree(case, dst, ignore=shutil.ignore_patterns("expected.safetensors", "oracle.json"))
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_every_architecture_refuses_a_non_positive_epsilon(case):
    raw = json.loads((case / "config.json").read_text())
    arch = lookup(raw)
    arch.normalize_config(dict(raw))  # the fixture itself is plausible
    key = _eps_key(raw)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ConfigError, match=f"'{key}' = .* is implausible") as exc:
            arch.normalize_config({**raw, key: bad})
        assert exc.value.exit_code == 2


@pytest.mark.parametrize("case,changes,key", [
    ("plamo2-tiny", {"rms_norm_eps": -1}, "rms_norm_eps"),
    ("plamo2-tiny", {"rope_theta": -5}, "rope_theta"),
    ("recurrent_gemma-tiny", {"partial_rotary_factor": 4}, "partial_rotary_factor"),
    ("recurrent_gemma-tiny", {"partial_rotary_factor": 0.0625}, "partial_rotary_factor"),  # 1 of 16 dims: odd
    ("recurrent_gemma-tiny", {"logits_soft_cap": -30}, "logits_soft_cap"),
    ("hybrids/qwen3_next-tiny", {"rope_parameters.rope_theta": -5}, "rope_parameters.rope_theta"),
    ("hybrids/qwen3_next-tiny", {"rope_parameters.partial_rotary_factor": 1.5}, "rope_parameters.partial_rotary_factor"),
    ("hybrids/bamba-tiny", {"time_step_limit": [0.1, 0.01]}, "time_step_limit"),
    ("hybrids/lfm2-tiny", {"norm_eps": 2.0}, "norm_eps"),
])
def test_cli_exit_2_naming_the_key(fixtures_dir, tmp_path, monkeypatch, capsys, case, changes, key):
    src = _copy(fixtures_dir / case, tmp_path / "src", **changes)
    rc, out = hc(monkeypatch, capsys, "convert", src, "-o", tmp_path / "out")
    assert rc == 2 and f"'{key}'" in out and "implausible" in out, out
    assert "Traceback" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    rc, out = hc(monkeypatch, capsys, "inspect", src)  # every command reads configs the same way
    assert rc == 2 and f"'{key}'" in out


def test_plausible_edges_still_convert(fixtures_dir, tmp_path):
    """The bounds are not tighter than real models: eps 1e-12, rope_theta 1e8,
    full rotation, no soft cap, an open time_step_limit."""
    convert(str(_copy(fixtures_dir / "recurrent_gemma-tiny", tmp_path / "a", rms_norm_eps=1e-12, rope_theta=1e8,
                      partial_rotary_factor=1.0, logits_soft_cap=None)), tmp_path / "a-out")
    assert check_plausible({"time_step_limit": [0.0, None]}, normalised=True)
    assert check_plausible({"time_step_limit": [0.0, float("inf")]}, normalised=True)
    assert check_plausible({"time_step_limit": [0.0, {"__float__": "Infinity"}]})  # raw, encoded infinity
    with pytest.raises(ConfigError, match="'rope_theta' must be a number"):
        check_plausible({"rope_theta": "10000"}, normalised=True)
