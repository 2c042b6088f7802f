"""Safety paths pinned where they were not (issue 28):

* a NaN / Inf in a conversion that changes dtype (the "cast in bounded chunks"
  path of convert.py) is refused, naming the tensor, as in a same-dtype copy;
* a signal stops convert at the next tensor (not just before the final rename);
* ``release`` never uploads a variant whose ``require_runtimes`` runtime cannot
  load it, and exits 1 (README, "release").
"""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hybridconv import interrupt
from hybridconv.convert import convert, plan
from hybridconv.errors import CheckpointError

from .conftest import hc, hybrid_case

PLAMO = "plamo2-tiny"
TENSOR = "model.layers.layers.1.mlp.down_proj.weight"  # a projection: cast as it is, no transform


@pytest.fixture(autouse=True)
def _no_pending_signal():
    interrupt.reset()
    yield
    interrupt.reset()


# --- non-finite values on the chunked cast path ------------------------------------------


@pytest.mark.parametrize("dtype,value", [("bfloat16", np.nan), ("float16", np.inf)])
def test_nonfinite_refused_when_the_dtype_changes(fixtures_dir, tmp_path, monkeypatch, capsys, dtype, value):
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / PLAMO, src)
    w = load_file(str(src / "model.safetensors"))
    assert w[TENSOR].dtype == np.float32
    w[TENSOR][3, 5] = value
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    # the tensor takes the chunked cast path: float32 -> the output dtype, nothing else
    step = next(s for s in plan(str(src), dtype).kept if s.source == TENSOR)
    assert step.dtype != "F32" and step.transpose is None and step.add is None and step.scale is None
    assert step.parts is None and step.select is None
    with pytest.raises(CheckpointError) as err:
        convert(str(src), tmp_path / "out", dtype=dtype)
    assert f"'{TENSOR}'" in err.value.message and "NaN or infinite" in err.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written
    code, text = hc(monkeypatch, capsys, "convert", src, "-o", tmp_path / "out", "--dtype", dtype)
    assert code == 2 and TENSOR in text and "--allow-nonfinite" in text, text
    assert "Traceback" not in text
    # allowed explicitly, it converts
    convert(str(src), tmp_path / "out", dtype=dtype, allow_nonfinite=True)
    assert (tmp_path / "out" / "config.json").is_file()


# --- a signal stops convert at the next tensor -------------------------------------------


def test_a_signal_stops_convert_at_the_next_tensor(fixtures_dir, tmp_path):
    """SIGTERM recorded while the first tensor (or run of unchanged tensors) is
    written: nothing more is written, the next tensor's safe point raises. A float32
    conversion of PLaMo-2 copies runs of unchanged tensors and transposes its conv
    kernels whole, paths with no safe point of their own inside."""
    written: list[str] = []

    def progress(nbytes, name):
        written.append(name)
        if len(written) == 1:
            interrupt.request(signal.SIGTERM)

    full = plan(str(fixtures_dir / PLAMO), "float32")
    assert len(full.kept) > 2
    with pytest.raises(interrupt.Terminated):
        convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="float32", progress=progress)
    assert len(written) == 1, f"written after the signal: {written[1:]}"
    assert list(tmp_path.iterdir()) == []
    # without the signal the same conversion reports many writes: the first was not the last
    interrupt.reset()
    written.clear()
    convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="float32", progress=lambda n, name: written.append(name))
    assert len(written) > 2


# --- release: require_runtimes ------------------------------------------------------------

RELEASE = """
name = "bamba"
mlx_lm_code = "never"  # without hybridconv's carried model file, mlx-lm has no Bamba to run
[source]
path = "{src}"
[verify]
random_tokens = 8
num_sequences = 1
decode_steps = 2
[[variants]]
name = "plain"
dtype = "float32"
repo_id = "org/bamba-plain"
[[variants]]
name = "for-mlx-lm"
dtype = "float32"
repo_id = "org/bamba-mlx-lm"
require_runtimes = ["mlx-lm"]
"""


def test_release_never_uploads_a_variant_its_required_runtime_cannot_load(tmp_path):
    """mlx-lm cannot load Bamba (without the carried model file): the variant that requires mlx-lm fails verification
    and is not uploaded, the one that does not is uploaded (mlx-lm's failure is only
    reported), and the run exits 1 (README: a failed variant makes the run exit 1)."""
    from .fake_hub import FakeHub
    from .test_publish import run

    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(RELEASE.format(src=hybrid_case("bamba-tiny")))
    with FakeHub() as hub:
        r = run(["release", plan_file, "--workdir", tmp_path / "work", "--json", tmp_path / "s.json"], tmp_path, hub)
    assert r.returncode == 1, r.stdout + r.stderr
    assert set(hub.repos) == {"org/bamba-plain"}
    assert not any("bamba-mlx-lm" in rq["path"] for rq in hub.requests)
    rows = {v["name"]: v for v in json.loads((tmp_path / "s.json").read_text())["variants"]}
    req = rows["for-mlx-lm"]
    assert req["verify"] == "fail" and req["upload"].startswith("refused"), req
    assert req["runtimes"] == {"hybridconv": "pass", "mlx-lm": "cannot load"}, req
    assert any(x.startswith("required runtime mlx-lm: cannot load") for x in req["reasons"]), req["reasons"]
    plain = rows["plain"]
    assert plain["verify"] == "pass" and plain["upload"] == "uploaded", plain
    assert plain["runtimes"]["mlx-lm"] == "cannot load"
    report = json.loads((tmp_path / "work" / "variants" / "for-mlx-lm" / "verification.json").read_text())
    assert report["verdict"] == "fail" and report["required_runtimes"] == ["mlx-lm"]
