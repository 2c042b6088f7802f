"""Downloads fetch only what a conversion reads: the weight files the index
names (or ``model*.safetensors`` without an index), config, index, tokenizer
and the small carried files — never another weight file such as the
Mistral-format ``consolidated.safetensors`` Mamba-Codestral ships beside its
shards. ``inspect`` on a Hub id that is not cached says what would be
downloaded, in bytes, reading only headers. Against the local fake Hub
(tests/fake_hub.py), through huggingface_hub's real client."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hybridconv
from hybridconv.convert import convert
from hybridconv.inspect import describe, inspect_plan

from .conftest import hybrid_case, oracle_logits
from .fake_hub import FakeHub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    with FakeHub() as server:
        monkeypatch.setattr(hc, "ENDPOINT", server.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


def _codestral_like(tmp_path):
    """mamba2-tiny as Mamba-Codestral is published: two transformers shards with an
    index, plus a Mistral-format consolidated.safetensors and params.json, a
    README and the tokenizer."""
    src = hybrid_case("mamba2-tiny")
    repo = tmp_path / "repo"
    repo.mkdir()
    w = load_file(str(src / "model.safetensors"))
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: w[n] for n in part}, str(repo / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"layers.0.mixer.A_log": w[names[0]]}, str(repo / "consolidated.safetensors"))
    (repo / "params.json").write_text("{}")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, repo / f)
    (repo / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    return repo, shards


def test_convert_fetches_only_the_indexed_shards(hub, tmp_path):
    repo, shards = _codestral_like(tmp_path)
    hub.add_model("mistralai/codestral-tiny", repo)
    out = tmp_path / "out"
    convert("mistralai/codestral-tiny", out, dtype="float32")
    fetched = set(hub.fetched("mistralai/codestral-tiny"))
    assert fetched == {*shards, "model.safetensors.index.json", "config.json", "tokenizer.json",
                       "tokenizer_config.json", "README.md"}
    ids, ref = oracle_logits(hybrid_case("mamba2-tiny"))
    got = np.array(hybridconv.load(out)(mx.array(ids)))
    assert np.abs(got - ref).max() < 1e-4


def test_without_an_index_only_model_safetensors(hub, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(hybrid_case("mamba-tiny"), repo)
    save_file({"x": np.zeros(4, np.float32)}, str(repo / "consolidated.safetensors"))
    (repo / "pytorch_model.bin").write_bytes(b"not fetched")
    hub.add_model("state-spaces/mamba-tiny", repo)
    convert("state-spaces/mamba-tiny", tmp_path / "out", dtype="float32")
    fetched = set(hub.fetched("state-spaces/mamba-tiny"))
    assert "model.safetensors" in fetched
    assert not fetched & {"consolidated.safetensors", "pytorch_model.bin", "expected.safetensors", "oracle.json"}


def test_inspect_says_what_would_be_downloaded(hub, tmp_path):
    repo, shards = _codestral_like(tmp_path)
    hub.add_model("mistralai/codestral-tiny", repo)
    info = describe(inspect_plan("mistralai/codestral-tiny"))
    d = info["download"]
    names = {f["name"] for f in d["files"]}
    assert set(shards) <= names and "consolidated.safetensors" not in names and "params.json" not in names
    assert d["bytes"] == sum((repo / n).stat().st_size for n in names)
    assert [f["name"] for f in d["not_fetched"]] == ["consolidated.safetensors"]
    assert "names" in d["note"]
    # headers only: the shards were read in part (HTTP ranges), never whole
    fetched = hub.fetched("mistralai/codestral-tiny")
    assert not set(shards) & set(fetched), fetched
    assert set(shards) <= set(hub.fetched("mistralai/codestral-tiny", ranges=True))
    assert info["parameters"] == describe(inspect_plan(str(hybrid_case("mamba2-tiny"))))["parameters"]


def test_cached_snapshot_is_used_offline(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    repo, _ = _codestral_like(tmp_path)
    hub.add_model("mistralai/codestral-tiny", repo)
    convert("mistralai/codestral-tiny", tmp_path / "a", dtype="float32")
    n = len(hub.requests)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    convert("mistralai/codestral-tiny", tmp_path / "b", dtype="float32")
    assert len(hub.requests) == n  # nothing asked of the Hub
    assert describe(inspect_plan("mistralai/codestral-tiny"))["download"] is None  # cached: nothing to fetch


def test_cached_snapshot_serves_when_the_hub_is_unreachable(hub, tmp_path, monkeypatch):
    """No network (and no HF_HUB_OFFLINE): the cached snapshot is used, as
    snapshot_download itself falls back to it."""
    import huggingface_hub.constants as hc

    repo, _ = _codestral_like(tmp_path)
    hub.add_model("mistralai/codestral-tiny", repo)
    convert("mistralai/codestral-tiny", tmp_path / "a", dtype="float32")
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    monkeypatch.setattr(hc, "ENDPOINT", dead)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    convert("mistralai/codestral-tiny", tmp_path / "b", dtype="float32")
    assert (tmp_path / "b" / "conversion.json").is_file()
