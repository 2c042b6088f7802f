"""Conversion mechanics: idempotent rules, the ledger, config normalisation,
atomic output, the Hub path through a local Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.converters import lookup
from hybridconv.converters.rules import ConvToMLX, Meta, plan_tensor
from hybridconv.errors import (
    ConfigError,
    LedgerError,
    UnsupportedArchitectureError,
    UsageError,
)
from hybridconv.safetensors_io import from_float32, to_float32

from .conftest import FIXTURE_CASES


def _copy(fixtures_dir, case, tmp_path) -> Path:
    dst = tmp_path / case
    shutil.copytree(fixtures_dir / case, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    dst.chmod(0o755)
    return dst


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_convert_twice_is_identity(fixtures_dir, tmp_path, case):
    first, second = tmp_path / "a", tmp_path / "b"
    convert(str(fixtures_dir / case), first, dtype="bfloat16")
    convert(str(first), second)  # default dtype: the folder's own (bfloat16)
    a = mx.load(str(first / "model.safetensors"))
    b = mx.load(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert mx.array_equal(a[k], b[k]).item(), k
    assert json.loads((first / "config.json").read_text()) == json.loads(
        (second / "config.json").read_text()
    )
    steps = plan(resolve(str(first))).steps
    assert all(s.applied == [] for s in steps)  # nothing left to do


def test_conv_rule_is_decided_from_config():
    rule = ConvToMLX(r"conv1d\.weight$", kernel_size=4)
    step = plan_tensor(Meta("x.conv1d.weight", "F32", (64, 1, 4)), [rule], "F32")
    assert step.shape == (64, 4, 1) and step.transpose == (0, 2, 1)
    again = plan_tensor(Meta("x.conv1d.weight", "F32", (64, 4, 1)), [rule], "F32")
    assert again.shape == (64, 4, 1) and again.transpose is None
    with pytest.raises(LedgerError, match="x.conv1d.weight"):
        plan_tensor(Meta("x.conv1d.weight", "F32", (64, 1, 3)), [rule], "F32")


def test_bfloat16_rounding_matches_mlx():
    x = np.random.default_rng(0).normal(size=10000).astype(np.float32) * 1000
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ours = from_float32(x, "BF16")
    theirs = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    assert np.array_equal(ours, theirs)
    assert np.array_equal(to_float32(ours, "BF16"), np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)))
    nan = from_float32(np.array([np.nan], dtype=np.float32), "BF16")
    assert np.isnan(to_float32(nan, "BF16")).all()


def test_transformers5_config_normalised(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    convert(str(fixtures_dir / "recurrent_gemma-tiny-hf5"), out, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["partial_rotary_factor"] == 0.5
    assert cfg["block_types"] == ["recurrent", "attention"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"


def test_underscore_block_types_and_validation(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "recurrent_gemma-tiny", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["_block_types"] = cfg.pop("block_types")
    (src / "config.json").write_text(json.dumps(cfg))
    p = plan(resolve(str(src)))
    assert [k for k, _ in p.arch.schedule(p.config)] == ["recurrent", "recurrent", "attention"]
    cfg["_block_types"] = ["recurrent", "mlp"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"block_types\[1\] is 'mlp'; allowed: recurrent, attention"):
        plan(resolve(str(src)))


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as exc:
        lookup({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert "plamo2" in str(exc.value) and "recurrent_gemma" in str(exc.value)
    assert lookup({"architectures": ["Plamo2ForCausalLM"]}).model_type == "plamo2"


def test_missing_required_field_names_aliases(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "plamo2-tiny", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size_per_head"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hidden_size_per_head', 'head_dim'"):
        plan(resolve(str(src)))


def _edit_weights(src: Path, fn):
    tensors = load_file(str(src / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_ledger_missing_tensor(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "plamo2-tiny", tmp_path)
    _edit_weights(src, lambda t: t.pop("model.layers.layers.2.mixer.D"))
    with pytest.raises(LedgerError, match=r"model.layers.layers.2.mixer.D"):
        plan(resolve(str(src)))


def test_ledger_extra_tensor(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "recurrent_gemma-tiny", tmp_path)
    _edit_weights(src, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(LedgerError, match="model.extra.weight"):
        plan(resolve(str(src)))


def test_ledger_shape_inconsistent_with_config(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "plamo2-tiny", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LedgerError, match=r"mlp\.(gate_up|down)_proj\.weight"):
        plan(resolve(str(src)))


def test_ledger_layer_count(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "recurrent_gemma-tiny", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LedgerError, match="num_hidden_layers = 2"):
        plan(resolve(str(src)))
    cfg["num_hidden_layers"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LedgerError, match="num_hidden_layers = 5"):
        plan(resolve(str(src)))


def test_tied_lm_head_is_dropped_with_reason(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "plamo2-tiny", tmp_path)
    _edit_weights(src, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    record = json.loads((out / "conversion.json").read_text())
    dropped = [t for t in record["tensors"] if t["target"] is None]
    assert [t["source"] for t in dropped] == ["lm_head.weight"]
    assert "tied" in dropped[0]["dropped_because"]


def test_existing_output_refused_then_forced(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    convert(str(fixtures_dir / "plamo2-tiny"), out, dtype="float32")
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        convert(str(fixtures_dir / "plamo2-tiny"), out)
    # --force replaces a previous hybridconv output (only once the new one is complete)
    convert(str(fixtures_dir / "plamo2-tiny"), out, dtype="bfloat16", force=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left


def test_force_refuses_a_folder_that_is_not_an_output(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match="not a hybridconv output.*keep.txt"):
        convert(str(fixtures_dir / "plamo2-tiny"), out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    # a previous output with a file of the user's added is refused too, naming the file
    out2 = tmp_path / "out2"
    convert(str(fixtures_dir / "plamo2-tiny"), out2)
    (out2 / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        convert(str(fixtures_dir / "plamo2-tiny"), out2, force=True)
    assert (out2 / "notes.txt").read_text() == "mine"
    # an empty folder holds nothing to lose
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(str(fixtures_dir / "plamo2-tiny"), empty, force=True)
    assert (empty / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing(fixtures_dir, tmp_path):
    out = tmp_path / "out"

    def boom(n, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(fixtures_dir / "plamo2-tiny"), out, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_source_is_never_modified(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "recurrent_gemma-tiny", tmp_path)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()}
    convert(str(src), tmp_path / "out", dtype="float16")
    after = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()}
    assert before == after


def test_sharded_source_gives_sharded_output(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, "recurrent_gemma-tiny", tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(src / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(halves)
    expected = mx.load(str(fixtures_dir / "recurrent_gemma-tiny" / "expected.safetensors"))
    got = np.array(hybridconv.load(out)(expected["input_ids"]))
    assert np.abs(got - np.array(expected["logits"])).max() < 1e-4


def _lay_into_hf_cache(fixture: Path, cache: Path, repo_id: str) -> str:
    """The hub's own cache layout: blobs by hash, a snapshot of symlinks, refs/main."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in fixture.iterdir():
        if f.name in ("expected.safetensors", "oracle.json"):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_repo_id_source_through_hf_cache(fixtures_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    commit = _lay_into_hf_cache(fixtures_dir / "plamo2-tiny", cache, "pfnet/plamo-2-tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    result = convert("pfnet/plamo-2-tiny", out, dtype="float32")
    assert result.plan.source.repo_id == "pfnet/plamo-2-tiny"
    assert result.plan.source.revision == commit
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"] == "pfnet/plamo-2-tiny" and record["source_revision"] == commit
    expected = mx.load(str(fixtures_dir / "plamo2-tiny" / "expected.safetensors"))
    got = np.array(hybridconv.load(out)(expected["input_ids"]))
    assert np.abs(got - np.array(expected["logits"])).max() < 1e-4
    from hybridconv.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        convert("pfnet/not-cached", tmp_path / "out2")


def test_nonfinite_scan_windows(tmp_path, monkeypatch):
    """The memory-mapped NaN/Inf scan finds exactly the bad tensors, across window
    boundaries and at odd offsets, for float32, float16 and bfloat16."""
    import hybridconv.safetensors_io as sio

    monkeypatch.setattr(sio, "CHUNK_BYTES", 4096 * 3 + 8)
    rng = np.random.default_rng(1)
    for trial in range(20):
        entries, blobs, want = [], [], set()
        for i in range(6):
            n = int(rng.integers(1, 20000))
            x = rng.normal(size=n).astype(np.float32)
            if rng.random() < 0.5:
                x[int(rng.integers(0, n))] = np.inf if rng.random() < 0.5 else np.nan
                want.add(f"t{i}")
            dtype = ["F32", "F16", "BF16"][i % 3]
            raw = x if dtype == "F32" else x.astype(np.float16) if dtype == "F16" else from_float32(x, "BF16")
            entries.append((f"t{i}", dtype, (n,)))
            blobs.append(raw.tobytes())
        path = tmp_path / f"x{trial}.safetensors"
        path.write_bytes(sio.header_bytes(entries, {}) + b"".join(blobs))
        info, _ = sio.read_header(path)
        assert set(sio.scan_nonfinite(path, list(info.values()))) == want


def test_inspect_repo_id_reads_remote_headers_only(fixtures_dir, tmp_path, monkeypatch):
    """Not cached: config.json is downloaded, the safetensors headers come from the
    Hub's range requests (faked at huggingface_hub's API), no weights are fetched."""
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants as hc

    from hybridconv.inspect import describe, inspect_plan
    from hybridconv.safetensors_io import read_header

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fixture = fixtures_dir / "recurrent_gemma-tiny-hf5"
    downloaded = []
    snap = tmp_path / "snap" / ("ab" * 20)
    snap.mkdir(parents=True)
    shutil.copyfile(fixture / "config.json", snap / "config.json")

    def fake_download(repo_id, filename, revision=None, **kw):
        downloaded.append(filename)
        return str(snap / filename)

    def fake_metadata(self, repo_id, revision=None, **kw):
        tensors, _ = read_header(fixture / "model.safetensors")
        start = min(t.begin for t in tensors.values())
        files = {"model.safetensors": SimpleNamespace(tensors={
            n: SimpleNamespace(dtype=t.dtype, shape=list(t.shape), data_offsets=(t.begin - start, t.end - start))
            for n, t in tensors.items()})}
        return SimpleNamespace(files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", fake_metadata)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, revision=None, **kw: None)
    siblings = [SimpleNamespace(rfilename=f.name, size=f.stat().st_size) for f in fixture.iterdir()]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, **kw: SimpleNamespace(sha="ab" * 20, siblings=siblings))
    remote = describe(inspect_plan("google/recurrentgemma-tiny"))
    local = describe(inspect_plan(str(fixture)))
    assert downloaded == ["config.json"]
    assert remote["source_revision"] == "ab" * 20
    for key in ("layers", "parameters", "source_tensors", "source_bytes", "estimated_output_bytes", "rules"):
        assert remote[key] == local[key], key
