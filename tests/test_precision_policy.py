"""The precision policy of ``quantize`` (README, "quantize", *Precision policy*),
asserted on what is stored, for every registered architecture.

One table-driven test: each registered architecture's oracle fixture is
quantized to 4 bits with ``--dtype bfloat16`` (the output where "float32" and
"the output dtype" differ), and every tensor of a protected kind — SSM /
recurrence dynamics, the RG-LRU decay, MoE routers and their routing biases,
RG-LRU gates, conv kernels, norms — is checked against :data:`POLICY`, the
README's promise written as data. Which tensors to check comes from the
architecture itself: every tensor its ``PROTECTED`` table (``Architecture.
protected``) names must be of a kind in :data:`POLICY` (a new architecture, or a
new protected kind, fails here until the policy says what it is), and every
tensor of a kind in :data:`POLICY` must be stored as the policy says whether or
not the architecture's table remembers it (a router dropped from a table, or a
``float32`` flag lost, is caught). A new architecture is covered as soon as it is
registered and has a fixture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hybridconv.checkpoint import index_weights
from hybridconv.converters.registry import lookup, supported
from hybridconv.errors import HybridconvError

from .conftest import FIXTURES

# (kind, pattern on the output tensor name, how it is stored). Never quantized, all
# of them; "float32": float32 whatever --dtype says; "output": the output's float
# dtype; "float": float32 where the conversion keeps the tensor float32 (a
# keep-float32 rule, for tensors the reference itself computes in float32: routers of
# Nemotron-H and Kimi-Linear, Inkling's and GLM-5's short-conv kernels, ZAYA's residual
# scales, GLM-5's hyper-connection base/scale), else the output dtype.
POLICY = (
    ("SSM / recurrence dynamics",
     r"\.(A_log|D|dt_bias|dt_proj\.bias|dt_proj_bias|slope_rate|time_decay|time_first|[fi]gate_preact\.bias)$",
     "float32"),
    ("RG-LRU decay parameter", r"\.rg_lru\.recurrent_param$", "float32"),
    ("MoE routing bias", r"\.(e_score_correction_bias|expert_bias|balancing_biases)$", "float32"),
    ("MoE router", r"\.(router(\.layer)?|gate|shared_expert_gate)\.weight$", "float"),
    ("RG-LRU gates", r"\.rg_lru\.(input|recurrent)_gate_(weight|bias)$", "output"),
    ("conv kernel", r"conv[^./]*\.(static_)?(weight|bias)$", "float"),
    ("norm weight",
     r"(norm[^./]*\.(weight|bias|scale)|norm_weight|\.[qk]_weight|\.(ln\d*|pre_ln|ln_out)\.(weight|bias))$",
     "output"),
    ("token-shift mix", r"\.time_mix_[a-z]+$", "output"),
    ("relative-position bias bank", r"\.(rel_logits_proj|relative_position_bias)\.proj$", "output"),
    ("scalar gain / residual scale",
     r"\.(global_scale|router_states_scale|temp|(input_)?hidden_states_(scale|bias)|residual_(scale|bias))$",
     "float"),
    ("residual / message queries and gates",
     r"\.(query|queries|kv_queries|(message|forget)_gate_proj\.weight)$", "float"),
    ("hyper-connection stream weights", r"_hc\.(base|fn|scale)$", "float"),
    ("indexer pool weighting", r"\.index_kpool_compress_(ape|gate)$", "float"),
)
OUTPUT = "BF16"  # the output dtype of the quantization below


def kind_of(name: str):
    return next(((k, how) for k, rx, how in POLICY if re.search(rx, name)), None)


def _fixture_cases() -> list[Path]:
    roots = [FIXTURES, FIXTURES / "hybrids", FIXTURES / "wave3"]
    return sorted(p for r in roots if r.is_dir() for p in r.iterdir() if (p / "config.json").is_file()
                  and (p / "expected.safetensors").is_file())


def fixture_for(model_type: str) -> Path | None:
    """The first oracle fixture (by name) of a registered architecture."""
    for case in _fixture_cases():
        try:
            if lookup(json.loads((case / "config.json").read_text())).model_type == model_type:
                return case
        except HybridconvError:  # a fixture for an architecture that has not landed yet
            continue
    return None


ARCHS = [a.model_type for a in supported()]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """model_type -> (its bf16 4-bit output folder, the conversion plan); built on first use."""
    from hybridconv.convert import plan
    from hybridconv.quant.run import quantize

    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            case = fixture_for(model_type)
            if case is None:
                pytest.fail(f"registered architecture {model_type} has no oracle fixture under {FIXTURES}: add one")
            out = tmp_path_factory.mktemp(model_type) / "q4"
            quantize(str(case), out, bits=4, dtype="bfloat16")
            cache[model_type] = (out, plan(str(case), "bfloat16"))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", ARCHS)
def test_protected_tensors_stored_as_the_policy_says(quantized, model_type):
    out, conversion = quantized(model_type)
    arch = lookup(json.loads((out / "config.json").read_text()))
    kept_f32 = {s.target for s in conversion.kept if s.keep_float32}
    tensors = index_weights(out).tensors
    names = set(tensors)
    quantized_names = {n[: -len(".scales")] + ".weight" for n in names if n.endswith(".scales")}
    problems, checked = [], {}
    for name, info in sorted(tensors.items()):
        if name.endswith((".scales", ".biases")) and name[: -len(".scales")] + ".weight" in quantized_names:
            continue  # a quantized matrix's scales / biases
        kind = kind_of(name)
        protection = arch.protection_of(name)
        if protection is not None and kind is None:
            problems.append(f"{name}: protected ({protection.why}) but of no kind in POLICY: extend the policy "
                            "(README, 'Precision policy') and this table")
            continue
        if kind is None:
            continue
        what, how = kind
        checked[what] = checked.get(what, 0) + 1
        if name in quantized_names:
            problems.append(f"{name} ({what}): stored quantized; the policy never quantizes it")
            continue
        want = {"float32": "F32", "output": OUTPUT, "float": "F32" if name in kept_f32 else OUTPUT}[how]
        if info.dtype != want:
            problems.append(f"{name} ({what}): stored {info.dtype}, the policy says {want}")
    assert not problems, "\n".join(problems)
    assert checked, f"{model_type}: no tensor of a protected kind found"
    print(model_type, checked)


def test_every_protected_kind_is_exercised(quantized):
    """Each kind in POLICY occurs in at least one architecture's output: a pattern
    that matches nothing anywhere (a rename, a typo) would check nothing."""
    seen = set()
    for model_type in ARCHS:
        out, _ = quantized(model_type)
        for name in index_weights(out).tensors:
            kind = kind_of(name)
            if kind:
                seen.add(kind[0])
    assert seen == {k for k, _, _ in POLICY}, {k for k, _, _ in POLICY} - seen
