"""Runtimes (issue 11): verify runs a converted folder in hybridconv and in
mlx-lm, reports each runtime's verdict, and inspect and the model card say what
mlx-lm does with the weights.

Cases known to fall in each class (mlx-lm 0.32.2), for mlx-lm's OWN model (the
outputs here are converted with --mlx-lm-code never, so that they carry no
model file and mlx-lm's built-in model is what runs; tests/test_mlx_lm_code.py
covers the outputs that carry hybridconv's): mamba-tiny and falcon_h1-tiny
(every µP multiplier != 1, folded into the weights) pass in mlx-lm; jamba-tiny
opens but differs (renormalised router weights); bamba-tiny cannot be loaded
(no such model); RecurrentGemma with conv1d_width 3 or lru_width != hidden_size
cannot be loaded (built here with transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridconv.convert import convert
from hybridconv.errors import UsageError
from hybridconv.loading import load_config
from hybridconv.verify.reference import read_reference_file
from hybridconv.verify.run import verify_folder

from .conftest import assert_logits_close, hc, hybrid_case, random_ids, save_hf_recurrent_gemma, torch_logits

CASES = ("mamba-tiny", "jamba-tiny", "bamba-tiny", "falcon_h1-tiny")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Each case converted in float32 and verified with both runtimes against its
    oracle logits (verification.json written, as the CLI does)."""
    from hybridconv.verify.run import REPORT_NAME, write_report

    base = tmp_path_factory.mktemp("runtimes")
    out = {}
    for case in CASES:
        out[case] = base / case
        convert(str(hybrid_case(case)), out[case], dtype="float32", mlx_lm_code="never")
        ref = read_reference_file(hybrid_case(case) / "expected.safetensors")
        write_report(verify_folder(out[case], ref, runtimes=("hybridconv", "mlx-lm")).report,
                     out[case] / REPORT_NAME)
    return out


def report_of(folder: Path) -> dict:
    return json.loads((folder / "verification.json").read_text())


@pytest.fixture(scope="module")
def rg_outputs(tmp_path_factory) -> dict[str, Path]:
    """RecurrentGemmas mlx-lm cannot build: conv1d_width 3, lru_width != hidden_size.
    The reference file holds transformers' logits in the fixtures' layout."""
    from safetensors.numpy import save_file

    base = tmp_path_factory.mktemp("rg")
    out = {}
    for name, over in (("conv3", dict(conv1d_width=3)), ("lru96", dict(lru_width=96))):
        src = base / f"{name}-src"
        model = save_hf_recurrent_gemma(src, seed=3, **over)
        ids = random_ids(320, 20, seed=1)
        save_file({"input_ids": ids, "logits": torch_logits(model, ids).astype(np.float32)},
                  str(src / "expected.safetensors"))
        out[name] = base / name
        convert(str(src), out[name], dtype="float32", mlx_lm_code="never")
        out[name + "-ref"] = src / "expected.safetensors"
    return out


# --- verify: one result per runtime, each class ---------------------------------------------


def test_mlx_lm_computes_it(outputs):
    r = report_of(outputs["mamba-tiny"])
    assert r["schema"] == "hybridconv.verification/2" and r["verdict"] == "pass"
    assert list(r["runtimes"]) == ["hybridconv", "mlx-lm"]
    m = r["runtimes"]["mlx-lm"]
    assert m["verdict"] == "pass" and m["loader"] == "mlx_lm.utils.load_model" and m["version"]
    # nothing carried: mlx-lm's own model ran, in a process without hybridconv's model code
    assert m["trust_remote_code"] is False and m["model_code"]["class"] == "mlx_lm.models.mamba.Model"
    assert not [x for x in m["hybridconv_modules_in_process"] if x not in ("hybridconv", "hybridconv.blas")]
    assert m["metrics"]["overall"]["kl_mean"] < 1e-8 and m["decode"]["kl_max"] < 1e-6
    assert m["expected"]["status"] == "computes"
    # the top level is hybridconv's result (schema /1's keys)
    assert r["metrics"] == r["runtimes"]["hybridconv"]["metrics"] and r["runtime"] == "hybridconv"


def test_mlx_lm_differs_with_metrics(outputs):
    r = report_of(outputs["jamba-tiny"])
    assert r["verdict"] == "pass"  # hybridconv's: the conversion is right
    m = r["runtimes"]["mlx-lm"]
    assert m["verdict"] == "fail" and m["expected"]["status"] == "differs"
    # measured: max |Δlogit| 0.845, mean KL 0.018 (renormalised top-2 router weights)
    assert m["metrics"]["overall"]["max_abs_logit_diff"] == pytest.approx(0.845, abs=0.01)
    assert any(c["gate"] == "max_kl_mean" and not c["passed"] for c in m["checks"])
    assert "renormalised" in m["expected"]["reason"]


def test_mlx_lm_cannot_load(outputs):
    r = report_of(outputs["bamba-tiny"])
    m = r["runtimes"]["mlx-lm"]
    assert r["verdict"] == "pass" and m["verdict"] == "cannot load" and m["metrics"] is None
    assert "bamba not supported" in m["message"] and m["expected"]["status"] == "cannot open"


@pytest.mark.parametrize("name,why", [("conv3", "conv1d_width 3"), ("lru96", "lru_width 96")])
def test_recurrent_gemma_mlx_lm_cannot_load(rg_outputs, name, why):
    out = rg_outputs[name]
    arch, config = load_config(out)
    known = arch.mlx_lm_support(config)
    assert known.status == "cannot open" and why in known.reason
    r = verify_folder(out, read_reference_file(rg_outputs[name + "-ref"]), runtimes=("hybridconv", "mlx-lm"),
                      decode_steps=4).report
    assert r["verdict"] == "pass", r["failure_reasons"]
    assert r["runtimes"]["mlx-lm"]["verdict"] == "cannot load", r["runtimes"]["mlx-lm"]
    # required, it fails the verification
    r = verify_folder(out, read_reference_file(rg_outputs[name + "-ref"]), runtimes=("hybridconv", "mlx-lm"),
                      require=("mlx-lm",), decode_steps=0).report
    assert r["verdict"] == "fail" and "required runtime mlx-lm: cannot load" in r["failure_reasons"][-1]


def test_falcon_h1_multipliers_folded_mlx_lm_computes_reference(outputs):
    """Every multiplier of falcon_h1-tiny is != 1; folded into the weights, mlx-lm
    computes the reference function within the float32 fixture tolerance."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from .conftest import oracle_logits

    out = outputs["falcon_h1-tiny"]
    cfg = json.loads((out / "config.json").read_text())
    for key in ("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                "key_multiplier", "ssm_in_multiplier", "ssm_out_multiplier"):
        assert cfg[key] != 1, key
    assert all(m != 1 for m in cfg["ssm_multipliers"] + cfg["mlp_multipliers"])
    ids, ref = oracle_logits(hybrid_case("falcon_h1-tiny"))
    model, _ = load_model(out)
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    r = report_of(out)
    assert r["runtimes"]["mlx-lm"]["verdict"] == "pass" and r["runtimes"]["hybridconv"]["verdict"] == "pass"


def test_runtime_arguments_checked():
    ref = read_reference_file(hybrid_case("mamba-tiny") / "expected.safetensors")
    with pytest.raises(UsageError, match="unknown runtime"):
        verify_folder(Path("/nonexistent"), ref, runtimes=("torch",))
    with pytest.raises(UsageError, match="required but not run"):
        verify_folder(Path("/nonexistent"), ref, runtimes=("hybridconv",), require=("mlx-lm",))


# --- the CLI: exit codes with and without --require-runtime ---------------------------------


def test_cli_exit_codes(outputs, monkeypatch, capsys, tmp_path):
    jamba, ref = outputs["jamba-tiny"], hybrid_case("jamba-tiny") / "expected.safetensors"
    args = ("verify", jamba, "--reference-logits", ref, "--decode-steps", "2")
    code, text = hc(monkeypatch, capsys, *args, "--json", tmp_path / "v.json")
    assert code == 0 and "WARNING: mlx-lm fail" in text and "not a failure of the conversion" in text
    assert json.loads((tmp_path / "v.json").read_text())["runtimes"]["mlx-lm"]["verdict"] == "fail"
    code, text = hc(monkeypatch, capsys, *args, "--no-report", "--require-runtime", "mlx-lm")
    assert code == 1 and "required runtime mlx-lm: fail" in text
    code, _ = hc(monkeypatch, capsys, *args, "--no-report", "--runtime", "hybridconv", "--json", tmp_path / "h.json")
    assert code == 0 and list(json.loads((tmp_path / "h.json").read_text())["runtimes"]) == ["hybridconv"]
    code, text = hc(monkeypatch, capsys, *args, "--no-report", "--runtime", "hybridconv", "--require-runtime", "mlx-lm")
    assert code == 2 and "not run" in text
    code, text = hc(monkeypatch, capsys, *args, "--no-report", "--runtime", "torch")
    assert code == 2
    # mlx-lm computes mamba-tiny: required, it passes
    code, text = hc(monkeypatch, capsys, "verify", outputs["mamba-tiny"], "--reference-logits",
                    hybrid_case("mamba-tiny") / "expected.safetensors", "--no-report", "--require-runtime", "mlx-lm")
    assert code == 0 and "WARNING" not in text


# --- inspect and the model card ---------------------------------------------------------------


def test_inspect_says_what_mlx_lm_does(monkeypatch, capsys, rg_outputs):
    code, text = hc(monkeypatch, capsys, "inspect", hybrid_case("jamba-tiny"))
    assert code == 0 and "│ mlx-lm │ opens but differs: mlx-lm takes the softmax over the top-2 router logits" in text
    code, text = hc(monkeypatch, capsys, "inspect", hybrid_case("bamba-tiny"), "--json")
    assert code == 0 and json.loads(text)["mlx_lm"]["status"] == "cannot open"
    code, text = hc(monkeypatch, capsys, "inspect", rg_outputs["conv3"].parent / "conv3-src", "--json")
    assert json.loads(text)["mlx_lm"]["status"] == "cannot open"
    code, text = hc(monkeypatch, capsys, "inspect", hybrid_case("falcon_h1-tiny"))
    assert "│ mlx-lm │ opens and computes it: the multipliers are folded into the weights" in text


def test_card_mlx_lm_snippet_only_where_mlx_lm_passed(outputs):
    from hybridconv.publish.card import render_card

    good = render_card(outputs["mamba-tiny"], "org/mamba-tiny")
    assert "## Runtimes" in good and "| mlx-lm | 0.32" in good and "| pass |" in good
    assert 'from mlx_lm import load, generate' in good and "hybridconv.load(" in good
    assert "Warning: not for mlx-lm" not in good
    for case, what in (("jamba-tiny", "computes a different function"), ("bamba-tiny", "cannot load")):
        card = render_card(outputs[case], f"org/{case}")
        assert "from mlx_lm import" not in card and "Warning: not for mlx-lm" in card and what in card, card
        assert "hybridconv.load(" in card


def test_card_without_mlx_lm_result(outputs, tmp_path):
    """A report from verify --runtime hybridconv: mlx-lm was not checked, so no snippet."""
    import shutil

    from hybridconv.publish.card import render_card

    folder = tmp_path / "m"
    shutil.copytree(outputs["mamba-tiny"], folder)
    rep = report_of(folder)
    rep["runtimes"].pop("mlx-lm")
    (folder / "verification.json").write_text(json.dumps(rep))
    card = render_card(folder, "org/m")
    assert "not checked" in card and "from mlx_lm import" not in card


def test_release_plan_require_runtimes(tmp_path):
    from hybridconv.publish.release import load_plan

    def plan(extra: str) -> Path:
        p = tmp_path / "plan.toml"
        p.write_text(f'[source]\npath = "src"\n[[variants]]\nname = "bf16"\ndtype = "bfloat16"\n{extra}\n')
        return p

    assert load_plan(plan('require_runtimes = ["mlx-lm"]')).variants[0].require_runtimes == ["mlx-lm"]
    assert load_plan(plan("")).variants[0].require_runtimes == []
    with pytest.raises(UsageError, match="require_runtimes entry 'mlxlm'"):
        load_plan(plan('require_runtimes = ["mlxlm"]'))
    with pytest.raises(UsageError, match="require_runtimes must be a list of strings"):
        load_plan(plan('require_runtimes = "mlx-lm"'))


def test_lossy_precision_hides_a_difference_and_says_so(tmp_path):
    """4-bit Jamba: mlx-lm's renormalised routing stays within the 4-bit gates
    (measured: mean KL 0.028 vs the float32 oracle, gate 0.15), so mlx-lm passes;
    the report and the card note that it computes another function."""
    from hybridconv.publish.card import render_card
    from hybridconv.quant.run import quantize
    from hybridconv.verify.run import REPORT_NAME, write_report

    out = tmp_path / "q4"
    quantize(str(hybrid_case("jamba-tiny")), out, 4, dtype="float32", mlx_lm_code="never")
    report = verify_folder(out, read_reference_file(hybrid_case("jamba-tiny") / "expected.safetensors"),
                           runtimes=("hybridconv", "mlx-lm"), decode_steps=2).report
    m = report["runtimes"]["mlx-lm"]
    assert report["verdict"] == "pass" and m["verdict"] == "pass", m["failure_reasons"]
    assert "computes another function" in m["note"] and "renormalised" in m["note"]
    write_report(report, out / REPORT_NAME)
    card = render_card(out, "org/q4")
    assert "from mlx_lm import" in card and "**Note:** mlx-lm passes this precision's gates" in card


def test_mlx_lm_cannot_run_short_plamo2(tmp_path):
    """PLaMo-2 with num_hidden_layers <= mamba_step // 2: mlx-lm loads the weights
    and fails computing (IndexError): verdict "cannot run", known from the config."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    import hybridconv

    from .conftest import plamo2_config, save_hf_plamo2

    save_hf_plamo2(tmp_path / "src", plamo2_config(num_hidden_layers=2, mamba_step=4), seed=1)
    out = tmp_path / "out"
    convert(str(tmp_path / "src"), out, dtype="float32", mlx_lm_code="never")
    arch, config = load_config(out)
    assert arch.mlx_lm_support(config).status == "cannot open"
    ids = random_ids(320, 12, seed=2)
    logits = np.array(hybridconv.load(out)(mx.array(ids)))  # hybridconv against itself: only mlx-lm is in question
    save_file({"input_ids": ids, "logits": logits}, str(tmp_path / "ref.safetensors"))
    r = verify_folder(out, read_reference_file(tmp_path / "ref.safetensors"), runtimes=("hybridconv", "mlx-lm"),
                      decode_steps=0).report
    m = r["runtimes"]["mlx-lm"]
    assert r["verdict"] == "pass" and m["verdict"] == "cannot run" and "IndexError" in m["message"], m


# What each architecture's statement says for configurations measured in the
# architecture tests (tests/test_arch_*.py assert mlx-lm's behaviour on them):
# the fixture's config with these keys changed, normalised as convert does.
KNOWN = [
    ("mamba2-tiny", dict(n_groups=2), "differs", "n_groups = 2"),
    ("granitemoehybrid-tiny", dict(mamba_n_groups=2), "differs", "mamba_n_groups = 2"),
    ("falcon_h1-tiny", dict(mamba_n_groups=2, mamba_rms_norm=True), "differs", "mamba_n_groups = 2"),
    ("falcon_h1-tiny", dict(time_step_limit=[0.02, 3.0]), "depends", "time_step_limit"),
    ("nemotron_h-tiny", dict(num_experts_per_tok=1), "differs", "num_experts_per_tok 1"),
    ("jamba-tiny", dict(expert_layer_offset=1, expert_layer_period=4), "cannot open", "i % 4 == 1"),
    ("qwen3_next-tiny", dict(layer_types=["full_attention", "linear_attention", "linear_attention",
                                          "full_attention"]), "cannot open", "full_attention_interval"),
    ("qwen3_5-tiny", dict(layer_types=["linear_attention", "full_attention"] * 2), "computes", ""),
    ("qwen3_5-tiny", dict(layer_types=["full_attention", "linear_attention", "linear_attention",
                                       "full_attention"]), "cannot open", "full_attention_interval"),
    ("lfm2-tiny", dict(tie_word_embeddings=False), "cannot open", "untied lm_head"),
    ("lfm2_moe-tiny", dict(layer_types=["conv"] * 4), "cannot open", "no attention layer"),
    ("kimi_linear-tiny", dict(q_lora_rank=24), "cannot open", "q_lora_rank 24"),
    ("kimi_linear-tiny", dict(attention_bias=True), "cannot open", "attention_bias"),
    ("plamo2-window-tiny", dict(attention_window_size=4096), "depends", "clips time steps"),
    ("zamba2-tiny", {}, "cannot open", "no Zamba2 model"),
]


@pytest.mark.parametrize("case,over,status,why", KNOWN)
def test_known_statements(case, over, status, why):
    from hybridconv.converters import lookup

    raw = {**json.loads((hybrid_case(case) / "config.json").read_text()), **over}
    arch = lookup(raw)
    known = arch.mlx_lm_support(arch.normalize_config(raw))
    assert known.status == status and why in known.reason, known


def test_mlx_lm_runs_on_the_same_arithmetic_as_hybridconv(tmp_path):
    """On a CPU, the default --runtime all must not fall back to the slow native
    kernels for mlx-lm: its model code runs on the stored weights in float32, as
    hybridconv's does, and the report says so. bf16 MoE experts are what MLX's CPU
    gather_mm cannot even run natively (float32 only), so this case fails without it."""
    out = tmp_path / "bf16"
    convert(str(hybrid_case("lfm2_moe-tiny")), out, dtype="bfloat16")
    report = verify_folder(out, read_reference_file(hybrid_case("lfm2_moe-tiny") / "expected.safetensors"),
                           runtimes=("hybridconv", "mlx-lm"), decode_steps=2).report
    ours, theirs = report["runtimes"]["hybridconv"], report["runtimes"]["mlx-lm"]
    assert theirs["verdict"] == "pass", theirs.get("failure_reasons")
    assert theirs["compute"]["path"] == ours["compute"]["path"] == "float32"
    # same weights, same arithmetic, same function: the two runtimes agree closely
    assert abs(theirs["metrics"]["overall"]["kl_mean"] - ours["metrics"]["overall"]["kl_mean"]) < 1e-6
