"""The verified model is the one that runs (issue 22): outputs carry hybridconv's
own model as an mlx-lm model file where mlx-lm's built-in model cannot run them
right, and mlx-lm's generate, prompt cache and server then compute the
reference's function.

* the carried file is made from hybridconv's model modules, statement for
  statement, and computes bit for bit what they compute (every architecture);
* every oracle case, and unseen configurations covering each difference in the
  README's "Model notes", converted in float32 and opened by mlx-lm in a process
  where ``import hybridconv`` fails, reproduces the reference logits, and a
  prefill through mlx-lm's prompt cache (saved to a file and read back) then
  single steps gives the same last logits; no case opens WITHOUT
  trust_remote_code and computes another function;
* ``mlx_lm.generate --trust-remote-code`` on float32 and 4-bit Bamba, Zamba2 and
  windowed PLaMo-2 outputs prints tokens, the same greedy tokens hybridconv's
  model gives; ``mlx_lm.server --trust-remote-code`` answers a completion;
* the policy (auto / always / never), the trust record (sha256 in
  conversion.json, in the weights hash that gates upload), verify's mlx-lm
  runtime, inspect and the card.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.convert import convert
from hybridconv.converters import supported
from hybridconv.mlx_lm_code import CARRIED_FILE, CarriedCodeError, closure, generate
from hybridconv.quant.run import quantize

from .conftest import (
    FIXTURES,
    FIXTURE_CASES,
    assert_logits_close,
    hybrid_case,
    oracle_logits,
    plamo2_config,
    random_ids,
    save_hf_plamo2,
    save_hf_recurrent_gemma,
    save_hf_transformers,
    tolerance,
    torch_logits,
)

HARNESS = Path(__file__).with_name("mlx_lm_harness.py")
HYBRIDS = sorted(p.name for p in (FIXTURES / "hybrids").iterdir() if (p / "expected.safetensors").is_file()) \
    if (FIXTURES / "hybrids").is_dir() else []
WAVE3 = sorted(p.name for p in (FIXTURES / "wave3").iterdir() if (p / "expected.safetensors").is_file()) \
    if (FIXTURES / "wave3").is_dir() else []
ORACLE = ([(c, FIXTURES / c) for c in FIXTURE_CASES] + [(c, FIXTURES / "hybrids" / c) for c in HYBRIDS]
          + [(c, FIXTURES / "wave3" / c) for c in WAVE3])
STEPS = 4  # single-token steps after the prompt-cache prefill


def _load_carried(path: Path):
    """The carried file imported as mlx-lm imports it (not registered in sys.modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the generated file: hybridconv's modules, statement for statement ---------------------------


class _Normalise(ast.NodeTransformer):
    """What the generator is allowed to change, undone on both sides: function
    annotations (strings in the file), docstring indentation, the
    ``__future__`` import, and imports from hybridconv.models (assignments from
    ``hybridconv_models.<module>`` in the file)."""

    def _doc(self, node):
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body[0].value.value = pyinspect.cleandoc(body[0].value.value)

    def visit_FunctionDef(self, node):
        self._doc(node)
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
            arg.annotation = None
        node.returns = None
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._doc(node)
        self.generic_visit(node)
        return node

    def visit_ImportFrom(self, node):
        if node.module == "__future__":
            return None
        base = node.module if node.level == 1 else None
        if node.level != 1:
            return node
        out = []
        for alias in node.names:
            value = ast.Attribute(ast.Name("hybridconv_models", ast.Load()), base or alias.name, ast.Load())
            if base:
                value = ast.Attribute(value, alias.name, ast.Load())
            out.append(ast.Assign([ast.Name(alias.asname or alias.name, ast.Store())], value))
        return out


def _normalised(body: list) -> str:
    mod = ast.Module(body=body, type_ignores=[])
    _Normalise()._doc(mod)
    mod = _Normalise().visit(mod)
    return ast.dump(ast.fix_missing_locations(mod), include_attributes=False)


@pytest.mark.parametrize("arch", supported(), ids=lambda a: a.model_type)
def test_carried_file_is_the_modules_statement_for_statement(arch, tmp_path):
    text = generate(arch)
    tree = ast.parse(text)
    wrappers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_module_")}
    modules = closure(arch.model_module.__name__.rsplit(".", 1)[1])
    assert [f"_module_{m.name}" for m in modules] == [n for n in wrappers]
    for m in modules:
        body = wrappers[f"_module_{m.name}"].body
        last = body[-1]
        assert ast.unparse(last) == "return _namespace(locals())"
        assert _normalised(body[:-1]) == _normalised(list(m.tree.body)), m.name
        assert m.sha256 in text  # the header names each module's source
    # imports: only mlx, mlx_lm and the standard library, no code loading
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                root = n.split(".")[0]
                assert root in ("mlx", "mlx_lm") or (root in sys.stdlib_module_names and root not in (
                    "socket", "subprocess", "importlib", "urllib", "http", "pickle", "ctypes")), (arch.model_type, n)
        if isinstance(node, ast.Name):
            assert node.id not in ("exec", "eval", "compile", "__import__", "open"), (arch.model_type, node.id)
    assert f"hybridconv {hybridconv.__version__}" in text and arch.title in text
    assert generate(arch) == text  # deterministic: the same bytes every time
    # imports and builds where only mlx and mlx-lm are needed
    (tmp_path / CARRIED_FILE).write_text(text)
    module = _load_carried(tmp_path / CARRIED_FILE)
    assert module.Model.__name__ == "Model" and hasattr(module.ModelArgs, "from_dict")


def _write_module(tmp_path, monkeypatch, name: str, source: str):
    import hybridconv.mlx_lm_code as code

    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "common.py").write_text((code.MODELS_DIR / "common.py").read_text())
    (models / f"{name}.py").write_text(source)
    monkeypatch.setattr(code, "MODELS_DIR", models)
    return code


@pytest.mark.parametrize("source,why", [
    ("import requests\n", "'requests', which is not mlx"),
    ("import socket\n", "'socket' (network"),
    ("from ..convert import plan\n", "relative import outside"),
    ("import hybridconv.convert\n", "imports hybridconv outside"),
    ("def f(x):\n    return eval(x)\n", "uses 'eval'"),
    ("X = 1\ndef f():\n    global X\n    X = 2\n", "global statement"),
    ("max = 3\n", "builtin name(s) max"),
    ("N = 1\nclass A:\n    N = N + 1\n", "reads and assigns N"),
    ("hybridconv_models = 1\n", "reserves"),
    ("from .nowhere import X\n", "not a module file"),
])
def test_generator_refuses_what_would_not_be_the_same_code(tmp_path, monkeypatch, source, why):
    code = _write_module(tmp_path, monkeypatch, "bad", "from .common import MLP\n" + source)
    with pytest.raises(CarriedCodeError, match=re.escape(why)):
        for m in code.closure("bad"):
            code.check_module(m)


@pytest.fixture(scope="module")
def with_code(tmp_path_factory) -> dict[str, Path]:
    """Every oracle case converted in float32 with --mlx-lm-code always."""
    base = tmp_path_factory.mktemp("always")
    return {name: _convert(src, base / name, "always") for name, src in ORACLE}


def _convert(src: Path, out: Path, policy: str) -> Path:
    convert(str(src), out, dtype="float32", mlx_lm_code=policy)
    return out


@pytest.mark.parametrize("case", [c for c, _ in ORACLE])
def test_carried_model_computes_what_hybridconvs_computes(with_code, case):
    """mlx-lm's loader building the carried file (in this process) and hybridconv's
    loader: the same logits and the same cached decode, bit for bit."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    out = with_code[case]
    ids, _ = oracle_logits(dict(ORACLE)[case])
    ours = hybridconv.load(out)
    theirs, _ = load_model(out, trust_remote_code=True)
    assert type(theirs).__module__ == "custom_model"
    a, b = ours(mx.array(ids)), theirs(mx.array(ids))
    assert mx.array_equal(a, b).item(), case
    ca, cb = ours.make_cache(), make_prompt_cache(theirs)
    assert [type(c) for c in ca] == [type(c) for c in cb]  # mlx-lm's own cache classes
    T = ids.shape[1]
    for start, stop in ((0, T - 3), (T - 3, T - 2), (T - 2, T - 1), (T - 1, T)):
        x = mx.array(ids[:, start:stop])
        assert mx.array_equal(ours(x, cache=ca), theirs(x, cache=cb)).item(), (case, start)


# --- mlx-lm in a process without hybridconv --------------------------------------------------------


@pytest.fixture(scope="module")
def shadow(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shadow")
    (d / "hybridconv").mkdir()
    (d / "hybridconv" / "__init__.py").write_text(
        'raise ImportError("hybridconv is not installed in this process (a shadow package)")\n')
    return d


@pytest.fixture(scope="module")
def auto_outputs(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """Every oracle case converted in float32 with the default --mlx-lm-code auto:
    (folder, ids, reference logits)."""
    base = tmp_path_factory.mktemp("auto")
    out = {}
    for name, src in ORACLE:
        ids, ref = oracle_logits(src)
        out[name] = (_convert(src, base / name, "auto"), ids, ref)
    return out


def _unseen_builders():
    """One unseen configuration per difference of mlx-lm's listed in the README's
    "Model notes" (beyond the oracle cases: plamo2-window-tiny, jamba-tiny,
    bamba-tiny, zamba2-tiny): name -> build(folder) -> reference model or logits fn."""
    from . import (test_arch_falcon_h1 as falcon_h1, test_arch_granitemoehybrid as granite,
                   test_arch_jamba as jamba, test_arch_kimi_linear as kimi, test_arch_lfm2 as lfm2,
                   test_arch_mamba as mamba, test_arch_nemotron_h as nemotron, test_arch_qwen3_next as qwen)

    def hf(config, cls):
        return lambda folder: save_hf_transformers(folder, config(), cls(), seed=5)

    def cls(module, name):
        return lambda: getattr(__import__(module, fromlist=[name]), name)

    t = "transformers"
    return {
        # PLaMo-2 with its only attention layer last (num_hidden_layers <= mamba_step // 2): mlx-lm crashes
        "plamo2-short": (lambda f: save_hf_plamo2(f, plamo2_config(num_hidden_layers=2, mamba_step=4), seed=1),
                         "plamo2"),
        # RecurrentGemma with conv1d_width 3 and lru_width != hidden_size: mlx-lm cannot load
        "rg-conv3-lru96": (lambda f: save_hf_recurrent_gemma(f, seed=3, conv1d_width=3, lru_width=96), t),
        # Mamba-2 with 2 groups: mlx-lm's gated norm ignores them
        "mamba2-groups": (hf(lambda: mamba._mamba2()[0], lambda: mamba._mamba2()[1]), t),
        # Jamba with experts at i % 4 == 1: mlx-lm cannot load
        "jamba-expert-offset": (hf(lambda: jamba._config(expert_layer_period=4, expert_layer_offset=1),
                                   cls("transformers", "JambaForCausalLM")), t),
        # Granite 4.0-H with 2 groups: mlx-lm's gated norm over all groups
        "granite-groups": (hf(lambda: granite._config(mamba_n_groups=2),
                              cls("transformers", "GraniteMoeHybridForCausalLM")), t),
        # Nemotron-H top-1 with norm_topk_prob: mlx-lm scales the expert by its raw score
        "nemotron-top1": (hf(lambda: nemotron._config(num_experts_per_tok=1, norm_topk_prob=True),
                             cls("transformers", "NemotronHForCausalLM")), t),
        # Falcon-H1 with grouped gated norm and a finite time-step limit
        "falcon_h1-groups-limit": (hf(lambda: falcon_h1._config(mamba_n_groups=2, mamba_rms_norm=True,
                                                                time_step_limit=(0.02, 3.0)),
                                      cls("transformers", "FalconH1ForCausalLM")), t),
        # Kimi-Linear with a query LoRA, MLA biases, dense layers first: mlx-lm cannot load
        "kimi-qlora-bias": (lambda f: kimi._build(f, kimi.UNSEEN["dense2-qlora-bias"][0], seed=7), t),
        # LFM2 without attention layers; LFM2-MoE with an untied head: mlx-lm cannot load
        "lfm2-all-conv": (lambda f: lfm2._build("lfm2", "all-conv-no-adjust", f), t),
        "lfm2_moe-untied": (lambda f: lfm2._build("lfm2_moe", "all-moe-plain-sigmoid", f), t),
        # Qwen3-Next with attention off the full_attention_interval: mlx-lm cannot load
        "qwen3_next-layer-order": (hf(lambda: qwen._qwen3_next_config(),
                                      cls("transformers", "Qwen3NextForCausalLM")), t),
    }


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """The unseen configurations, converted in float32 (auto): (folder, ids, reference logits)."""
    import torch

    from hybridconv.verify.torch_plamo2 import TorchPlamo2

    base = tmp_path_factory.mktemp("unseen")
    out = {}
    for i, (name, (build, kind)) in enumerate(sorted(_unseen_builders().items())):
        src = base / name / "src"
        ref_model = build(src)
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        ids = random_ids(vocab, 20, batch=2, seed=i)
        if kind == "plamo2":
            ref = TorchPlamo2(src)(torch.tensor(ids, dtype=torch.long)).numpy()
        else:
            ref = torch_logits(ref_model, ids)
        out[name] = (_convert(src, base / name / "out", "auto"), ids, ref)
    return out


GENERATE = ("bamba-tiny", "zamba2-tiny", "plamo2-window-tiny")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("q4")
    out = {}
    for case in GENERATE:
        out[case] = base / case
        quantize(str(hybrid_case(case)), out[case], 4, dtype="float32")
    return out


def _prompt_with_tokens(folder: Path) -> str:
    """A prompt whose greedy continuation by the (random, tiny) model decodes to some
    text before any end-of-sequence token: the fixtures' tokenizers know a few
    dozen words of the 256 ids, and mlx_lm.generate prints "No text generated"
    for ids that decode to nothing. Chosen with hybridconv's model."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(folder)
    model = hybridconv.load(folder)
    for prompt in ("hello world", "one two three", "a b c d", "the", "MLX", "x"):
        ids = tokenizer.encode(prompt)
        out = []
        for t, _ in generate_step(mx.array(ids), model, max_tokens=8):
            if int(t) in tokenizer.eos_token_ids:
                break
            out.append(int(t))
        if tokenizer.decode(out).strip():
            return prompt
    raise AssertionError(f"{folder}: no prompt tried gives text")


@pytest.fixture(scope="module")
def harness(auto_outputs, unseen, quantized, shadow, tmp_path_factory) -> dict:
    """One process where `import hybridconv` fails runs every folder through mlx-lm."""
    work = tmp_path_factory.mktemp("harness")
    cases = []
    for name, (folder, ids, _) in {**auto_outputs, **unseen}.items():
        np.save(work / f"{name}.ids.npy", ids.astype(np.int32))
        cases.append({"name": name, "folder": str(folder), "ids": str(work / f"{name}.ids.npy"),
                      "steps": STEPS, "out": str(work / f"{name}.npz")})
    gens = []
    prompt_ids = [5, 17, 42, 7, 99, 3]
    for case in GENERATE:
        for kind, folder in (("float32", auto_outputs[case][0]), ("4-bit", quantized[case])):
            gens.append({"name": f"{case} {kind}", "folder": str(folder), "prompt": _prompt_with_tokens(folder),
                         "max_tokens": 8, "ids": prompt_ids})
    spec = work / "spec.json"
    spec.write_text(json.dumps({"shadow": str(shadow), "cases": cases, "generate": gens}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(HARNESS), str(spec)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(Path(str(spec) + ".result").read_text())
    result["arrays"] = {c["name"]: dict(np.load(c["out"])) for c in cases}
    result["by_name"] = {c["name"]: c for c in result["cases"]}
    result["gen_by_name"] = {g["name"]: g for g in result["generate"]}
    result["prompt_ids"] = prompt_ids
    return result


def test_harness_cannot_import_hybridconv(harness):
    assert harness["hybridconv_importable"] is False and "shadow" in harness["hybridconv_import_error"]
    assert harness["hybridconv_modules"] == []


def _check_case(harness, name: str, folder: Path, ids: np.ndarray, ref: np.ndarray):
    rec, arrays = harness["by_name"][name], harness["arrays"][name]
    assert rec["ok"], rec.get("traceback")
    carries = (folder / CARRIED_FILE).is_file()
    # the reference's function, in mlx-lm: one forward, and prompt cache (file) + steps
    assert_logits_close(arrays["full"], ref)
    T = ids.shape[1]
    assert_logits_close(arrays["steps"], ref[:, T - STEPS:])
    assert np.abs(arrays["steps"] - arrays["full"][:, T - STEPS:]).max() <= tolerance(ref)
    assert rec["reloaded_classes"] == rec["cache_classes"]
    assert set(rec["cache_classes"]) <= {"KVCache", "RotatingKVCache", "ArraysCache", "CacheList"}
    # without trust_remote_code: refused where the folder carries code, else mlx-lm's own model computes it
    if carries:
        assert rec["model_class"].startswith("custom_model.") and rec["model_file"] == CARRIED_FILE
        assert "trust_remote_code" in rec["untrusted"], rec["untrusted"]
    else:
        assert rec["model_class"].startswith("mlx_lm.models.") and rec["untrusted"] == "opened"
        assert_logits_close(arrays["untrusted"], ref)
    return carries


@pytest.mark.parametrize("case", [c for c, _ in ORACLE])
def test_oracle_case_in_mlx_lm_without_hybridconv(harness, auto_outputs, case):
    folder, ids, ref = auto_outputs[case]
    carries = _check_case(harness, case, folder, ids, ref)
    from hybridconv.loading import load_config

    arch, config = load_config(folder)
    assert carries == (arch.mlx_lm_support(config).status != "computes"), case


@pytest.mark.parametrize("name", sorted(_unseen_builders()))
def test_unseen_configuration_in_mlx_lm_without_hybridconv(harness, unseen, name):
    """Each of these is a configuration mlx-lm's own model cannot run right: the
    output carries hybridconv's model, and mlx-lm computes the reference with it."""
    folder, ids, ref = unseen[name]
    assert _check_case(harness, name, folder, ids, ref), f"{name}: nothing carried"


@pytest.mark.parametrize("name", [f"{c} {k}" for c in GENERATE for k in ("float32", "4-bit")])
def test_mlx_lm_generate_prints_the_tokens_hybridconv_gives(harness, auto_outputs, quantized, name):
    from mlx_lm.generate import generate_step

    rec = harness["gen_by_name"][name]
    assert rec["ok"], rec.get("traceback")
    m = re.search(r"Generation: (\d+) tokens", rec["printed"])
    assert m and int(m.group(1)) >= 1, rec["printed"]
    assert "Prompt: " in rec["printed"]
    case, kind = name.split(" ")
    folder = auto_outputs[case][0] if kind == "float32" else quantized[case]
    model = hybridconv.load(folder)
    ours = [int(t) for t, _ in generate_step(mx.array(harness["prompt_ids"]), model, max_tokens=8)]
    # mlx-lm's stream_generate stops at an end-of-sequence token; up to there, the same greedy tokens
    theirs = rec["tokens"]
    assert theirs and theirs == ours[: len(theirs)], (theirs, ours)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_answers_a_completion(auto_outputs, shadow, tmp_path):
    """`mlx_lm.server --trust-remote-code` on a Bamba output (no such model in mlx-lm),
    started on a free local port in a process without hybridconv, stopped here."""
    folder = auto_outputs["bamba-tiny"][0]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(shadow)  # no hybridconv in the server's process
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--trust-remote-code",
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"prompt": "hello world", "max_tokens": 5, "temperature": 0.0}).encode()
        deadline = time.time() + 180
        answer = None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    answer = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert answer is not None, (proc.poll(), (tmp_path / "server.log").read_text()[-3000:])
        assert answer["usage"]["completion_tokens"] >= 1 and "text" in answer["choices"][0], answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- the policy, the trust record, verify, upload, inspect, the card -----------------------------


def _record(out: Path) -> dict:
    return json.loads((out / "conversion.json").read_text())["mlx_lm_code"]


def test_policy_auto_always_never(tmp_path):
    from hybridconv.errors import UsageError

    mamba, bamba = hybrid_case("mamba-tiny"), hybrid_case("bamba-tiny")
    # auto: nothing where mlx-lm's own model computes it
    out = _convert(mamba, tmp_path / "mamba-auto", "auto")
    cfg = json.loads((out / "config.json").read_text())
    assert "model_file" not in cfg and not (out / CARRIED_FILE).exists()
    assert _record(out)["carried"] is False and _record(out)["reason"] == "mlx-lm's own model computes it"
    # always: carried anyway
    out = _convert(mamba, tmp_path / "mamba-always", "always")
    assert json.loads((out / "config.json").read_text())["model_file"] == CARRIED_FILE
    # auto where mlx-lm cannot open it: carried, recorded with its sha256 and why
    out = _convert(bamba, tmp_path / "bamba-auto", "auto")
    rec = _record(out)
    from hybridconv.mlx_lm_code import sha256_of

    assert rec["carried"] and rec["file"] == CARRIED_FILE and rec["trust_remote_code"] is True
    assert rec["sha256"] == sha256_of((out / CARRIED_FILE).read_bytes()) and "no Bamba model" in rec["reason"]
    assert rec["mlx_lm_statement"]["status"] == "cannot open"
    # never: declined, the statement kept (inspect, verify and the card say what mlx-lm's own model does)
    out = _convert(bamba, tmp_path / "bamba-never", "never")
    assert not (out / CARRIED_FILE).exists() and "model_file" not in json.loads((out / "config.json").read_text())
    assert _record(out)["carried"] is False and "cannot open" in _record(out)["reason"]
    with pytest.raises(UsageError, match="--mlx-lm-code 'sometimes'"):
        convert(str(bamba), tmp_path / "x", dtype="float32", mlx_lm_code="sometimes")
    assert not (tmp_path / "x").exists()


def test_a_carrying_output_converted_again(tmp_path):
    """A source that carries a model file (a hybridconv output) never passes it on:
    the output carries what this conversion decides, made afresh."""
    first = _convert(hybrid_case("zamba2-tiny"), tmp_path / "first", "auto")
    again = _convert(first, tmp_path / "again", "auto")
    assert (again / CARRIED_FILE).read_bytes() == (first / CARRIED_FILE).read_bytes()  # deterministic
    (first / CARRIED_FILE).write_text("raise SystemExit('not hybridconv')\n")  # whatever the source holds
    again = _convert(first, tmp_path / "again2", "auto")
    assert "not hybridconv" not in (again / CARRIED_FILE).read_text()
    declined = _convert(first, tmp_path / "never", "never")
    assert not (declined / CARRIED_FILE).exists()
    assert "model_file" not in json.loads((declined / "config.json").read_text())
    q = tmp_path / "q4"
    quantize(str(first), q, 4, mlx_lm_code="never")
    assert not (q / CARRIED_FILE).exists() and _record(q)["policy"] == "never"
    quantize(str(first), tmp_path / "q4-auto", 4)
    assert _record(tmp_path / "q4-auto")["carried"] is True


@pytest.fixture(scope="module")
def verified_bamba(tmp_path_factory, auto_outputs) -> Path:
    """bamba-tiny (auto: carries the file), verified by both runtimes against its oracle."""
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import REPORT_NAME, verify_folder, write_report

    out = tmp_path_factory.mktemp("verified") / "bamba"
    shutil.copytree(auto_outputs["bamba-tiny"][0], out)
    ref = read_reference_file(hybrid_case("bamba-tiny") / "expected.safetensors")
    write_report(verify_folder(out, ref, runtimes=("hybridconv", "mlx-lm"), decode_steps=4).report, out / REPORT_NAME)
    return out


def test_verify_runs_what_mlx_lm_users_run(verified_bamba):
    r = json.loads((verified_bamba / "verification.json").read_text())
    m = r["runtimes"]["mlx-lm"]
    assert r["verdict"] == "pass" and m["verdict"] == "pass", m.get("failure_reasons")
    assert m["trust_remote_code"] is True and m["model_code"]["source"] == "carried"
    assert m["model_code"]["ran"] == "carried file" and m["model_code"]["matches"] is True
    assert m["model_code"]["class"].startswith("custom_model.") and m["expected"]["status"] == "computes"
    # the worker could not have used hybridconv's model code
    assert all(x in ("hybridconv", "hybridconv.blas") for x in m["hybridconv_modules_in_process"])
    assert m["metrics"]["overall"]["kl_mean"] < 1e-8 and m["decode"]["kl_max"] < 1e-6


def test_a_changed_carried_file_fails_upload_and_is_not_run(verified_bamba, tmp_path):
    from hybridconv.errors import UnverifiedError
    from hybridconv.publish.upload import check_verified
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import verify_folder

    out = tmp_path / "bamba"
    shutil.copytree(verified_bamba, out)
    check_verified(out)  # as verified
    code = out / CARRIED_FILE
    original = code.read_text()
    code.write_text(original + "\nimport os  # changed after verify\n")
    with pytest.raises(UnverifiedError, match="model code it carries changed after verification"):
        check_verified(out)
    # verify does not execute a file that is not the one hybridconv wrote
    ref = read_reference_file(hybrid_case("bamba-tiny") / "expected.safetensors")
    m = verify_folder(out, ref, runtimes=("mlx-lm",), decode_steps=0).report["runtimes"]["mlx-lm"]
    assert m["verdict"] == "not run" and "not the file hybridconv wrote" in m["message"]
    # nor does the config's pointer move unnoticed
    code.write_text(original)
    check_verified(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("model_file")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnverifiedError, match="changed after verification"):
        check_verified(out)


def test_inspect_shows_the_carried_file(verified_bamba, monkeypatch, capsys, tmp_path):
    from .conftest import hc

    code, text = hc(monkeypatch, capsys, "inspect", verified_bamba, "--json")
    info = json.loads(text)
    assert code == 0 and info["mlx_lm_code"]["carried"]["matches"] is True
    assert info["mlx_lm_code"]["carried"]["sha256"] == _record(verified_bamba)["sha256"]
    code, text = hc(monkeypatch, capsys, "inspect", hybrid_case("bamba-tiny"))
    assert "--mlx-lm-code auto carries hybridconv's model" in " ".join(text.split())
    code, text = hc(monkeypatch, capsys, "inspect", hybrid_case("mamba-tiny"))
    assert "--mlx-lm-code auto carries nothing" in " ".join(text.split())
    changed = tmp_path / "b"
    shutil.copytree(verified_bamba, changed)
    (changed / CARRIED_FILE).write_text("x = 1\n")
    code, text = hc(monkeypatch, capsys, "inspect", changed, "--json")
    assert json.loads(text)["mlx_lm_code"]["carried"]["matches"] is False


def test_card_says_trust_remote_code_where_mlx_lm_runs_the_carried_file(verified_bamba):
    from hybridconv.publish.card import render_card

    card = render_card(verified_bamba, "org/bamba-tiny")
    assert "mlx_lm.generate --model org/bamba-tiny --trust-remote-code" in card
    assert 'load("org/bamba-tiny", trust_remote_code=True)' in card
    assert f"`{CARRIED_FILE}`" in card and _record(verified_bamba)["sha256"] in card
    assert "Warning: not for mlx-lm" not in card
    assert f"| {CARRIED_FILE} (carried; --trust-remote-code) |" in card


def test_cli_and_release_plan_take_the_policy(monkeypatch, capsys, tmp_path):
    from hybridconv.errors import UsageError
    from hybridconv.publish.release import load_plan

    from .conftest import hc

    code, text = hc(monkeypatch, capsys, "convert", hybrid_case("bamba-tiny"), "-o", tmp_path / "o",
                    "--mlx-lm-code", "never")
    assert code == 0 and not (tmp_path / "o" / CARRIED_FILE).exists() and "nothing carried" in " ".join(text.split())
    code, text = hc(monkeypatch, capsys, "convert", hybrid_case("bamba-tiny"), "-o", tmp_path / "p")
    assert code == 0 and "run with --trust-remote-code" in " ".join(text.split())
    code, _ = hc(monkeypatch, capsys, "convert", hybrid_case("bamba-tiny"), "-o", tmp_path / "q",
                 "--mlx-lm-code", "maybe")
    assert code == 2
    code, text = hc(monkeypatch, capsys, "quantize", hybrid_case("bamba-tiny"), "-o", tmp_path / "r", "--bits", "4",
                    "--mlx-lm-code", "never")
    assert code == 0 and not (tmp_path / "r" / CARRIED_FILE).exists()

    def plan(top: str, variant: str) -> Path:
        p = tmp_path / "plan.toml"
        p.write_text(f'{top}\n[source]\npath = "src"\n[[variants]]\nname = "a"\ndtype = "bfloat16"\n{variant}\n'
                     '[[variants]]\nname = "b"\nbits = 4\n')
        return p

    assert [v.mlx_lm_code for v in load_plan(plan("", "")).variants] == ["auto", "auto"]
    assert [v.mlx_lm_code for v in load_plan(plan('mlx_lm_code = "never"', 'mlx_lm_code = "always"')).variants] \
        == ["always", "never"]
    with pytest.raises(UsageError, match="mlx_lm_code 'no'"):
        load_plan(plan("", 'mlx_lm_code = "no"'))


@pytest.mark.parametrize("case", ["bamba-tiny", "plamo2-window-tiny", "zamba2-tiny"])
def test_mlx_lm_batches_sequences_of_different_lengths(auto_outputs, case):
    """mlx-lm's BatchGenerator (what mlx_lm.server uses): prompts processed one at a
    time, then decoded together with different lengths (mlx-lm's left-padded batch
    caches, its masks, rotating windows past their size) give each sequence's own
    greedy tokens; prompts of different lengths in one prefill batch are refused, not
    computed wrong (their padding would enter the recurrent state)."""
    from mlx_lm.generate import batch_generate, generate_step
    from mlx_lm.utils import load

    model, tokenizer = load(str(auto_outputs[case][0]), trust_remote_code=True)
    prompts = [[5, 17, 42, 7, 99, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25]]
    alone = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=12)] for p in prompts]
    together = batch_generate(model, tokenizer, prompts, max_tokens=12, return_token_ids=True, prefill_batch_size=1)
    got = [list(map(int, t)) for t in together.token_ids]
    # batch_generate stops a sequence at an end-of-sequence token
    assert all(g and g == a[: len(g)] for g, a in zip(got, alone)), (got, alone)
    with pytest.raises(ValueError, match="--prompt-concurrency 1"):
        batch_generate(model, tokenizer, prompts, max_tokens=2)


def test_trimming_the_prompt_cache(tmp_path):
    """mlx-lm trims a prompt cache (its server reuses a cached prefix; speculative
    decoding rewinds) when every cache can be trimmed: an all-attention PLaMo-2 with a
    windowed layer (RotatingKVCache, before its ring fills) and full ones (KVCache).
    Trimmed and fed again, it gives the logits of a fresh pass; state caches (SSM
    layers) say they cannot be trimmed, and mlx-lm then does not."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cfg = plamo2_config(mamba_enabled=False, num_hidden_layers=3, attention_window_size=8, full_attention_idx=[2])
    save_hf_plamo2(tmp_path / "src", cfg, seed=3)
    out = _convert(tmp_path / "src", tmp_path / "out", "auto")
    model = hybridconv.load(out)
    ids = mx.array(random_ids(320, 7, seed=4))
    full = model(ids)
    cache = model.make_cache()
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache", "RotatingKVCache", "KVCache"]
    model(ids, cache=cache)
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 3) == 3
    again = model(ids[:, 4:], cache=cache)
    assert np.abs(np.array(again) - np.array(full[:, 4:])).max() <= tolerance(np.array(full))
    ssm = hybridconv.load(_convert(hybrid_case("bamba-tiny"), tmp_path / "bamba", "auto")).make_cache()
    assert not can_trim_prompt_cache(ssm)
