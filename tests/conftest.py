"""Shared helpers: the outside oracle fixtures, and tiny random checkpoints built
the same way (Hugging Face layout, PyTorch tensor layouts) in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Rich fixes a console's width at creation when COLUMNS is set (pytest-xdist's workers
# set COLUMNS=80): the CLI's consoles must read it per test (the helpers set 400)
os.environ.pop("COLUMNS", None)

import hybridconv  # noqa: F401  (first: loads an optimised BLAS before mlx; see hybridconv.blas)
import mlx.core as mx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("HYBRIDCONV_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file()) if FIXTURES.is_dir() else []


def tolerance(ref: np.ndarray) -> float:
    return 1e-4 + 1e-5 * float(np.abs(ref).max())


def assert_logits_close(got: np.ndarray, ref: np.ndarray, check_argmax: bool = True):
    got = np.asarray(got, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff <= tolerance(ref), f"max |Δ| {diff} > {tolerance(ref)}"
    if check_argmax:
        top2 = np.sort(ref, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 1e-3
        assert (got.argmax(-1) == ref.argmax(-1))[clear].all()


def load_builtin(path: Path):
    """mlx-lm's OWN model of a folder (``load_model``'s ``(model, config)``), ignoring
    a model file the folder carries: what mlx-lm computes without
    ``trust_remote_code`` and without hybridconv's code, the subject of the
    statements in converters/_mlx_lm.py. (Users of an output that carries
    hybridconv's model run that one: tests/test_mlx_lm_code.py.)"""
    from mlx_lm.utils import load_model

    return load_model(Path(path), model_config={"model_file": None})


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"oracle fixtures not found at {FIXTURES} (set HYBRIDCONV_FIXTURES)")
    return FIXTURES


def perturb_mlx(model, seed: int, scale: float = 0.05):
    """Move every parameter away from its initial value (as the fixtures do)."""
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    new = []
    for name, p in tree_flatten(model.parameters()):
        noise = rng.normal(0, scale, size=p.shape).astype(np.float32)
        new.append((name, p + mx.array(noise)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def copy_tokenizer(dst: Path):
    src = FIXTURES / "plamo2-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def save_hf_plamo2(folder: Path, config: dict, seed: int = 0):
    """A random PLaMo-2 checkpoint in HF layout, and mlx-lm's logits for it
    (the same oracle as the fixtures) when mlx-lm can build the model."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import plamo2 as ref

    folder.mkdir(parents=True, exist_ok=True)
    args = ref.ModelArgs.from_dict(config)
    model = ref.Model(args)
    perturb_mlx(model, seed)
    tensors = {}
    for name, p in tree_flatten(model.parameters()):
        a = np.array(p)
        if name.endswith("conv1d.weight"):
            a = np.ascontiguousarray(a.transpose(0, 2, 1))  # MLX [C,K,1] -> PyTorch [C,1,K]
        tensors[name] = a
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(folder)
    return model


def plamo2_config(**over) -> dict:
    cfg = {
        "architectures": ["Plamo2ForCausalLM"],
        "model_type": "plamo2",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size_per_head": 16,
        "max_position_embeddings": 2048,
        "attention_window_size": 2048,
        "full_attention_idx": [],
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_num_heads": 4,
        "mamba_step": 2,
        "mamba_chunk_size": 256,
        "mamba_enabled": True,
        "intermediate_size": 128,
        "vocab_size": 320,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def save_hf_recurrent_gemma(folder: Path, seed: int = 0, **over):
    """A random RecurrentGemma checkpoint written by transformers itself, and the
    transformers model (the oracle) for it."""
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_window_size=16,
        conv1d_width=4,
        block_types=["recurrent", "recurrent", "attention"],
    )
    kw.update(over)
    config = RecurrentGemmaConfig(**kw)
    torch.manual_seed(seed)
    model = RecurrentGemmaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


# ---------------------------------------------------------------------------
# The transformers-oracle cases in fixtures/hybrids/, and unseen cases of the
# same architectures built at test time with transformers' own classes.

HYBRIDS = FIXTURES / "hybrids"
WAVE3 = FIXTURES / "wave3"


def hybrid_case(name: str) -> Path:
    """Folder of one oracle case: ``fixtures/hybrids/NAME``, or ``fixtures/wave3/X``
    for ``name = "wave3/X"`` (fails the test if missing)."""
    path = FIXTURES / name if name.startswith("wave3/") else HYBRIDS / name
    if not (path / "expected.safetensors").is_file():
        pytest.fail(f"oracle case {path} not found (set HYBRIDCONV_FIXTURES)")
    return path


def oracle_logits(case: Path) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [1, T], logits float32 [1, T, V]) of an oracle case."""
    from safetensors.numpy import load_file

    data = load_file(str(case / "expected.safetensors"))
    return data["input_ids"], data["logits"]


def save_hf_transformers(folder: Path, config, model_cls, seed: int = 0, scale: float = 0.05):
    """Build ``model_cls(config)`` with transformers, move every parameter away
    from its initial value by ``scale·N(0, 1)`` (as the fixtures were made), save
    it with ``save_pretrained`` (safetensors, the exact HF layout) plus the
    fixtures' tokenizer, and return the float32 PyTorch model: the oracle."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return model


def random_ids(vocab: int, T: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, T)).astype(np.int32)


def decode_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits for ``ids`` [B, T] computed as a prefill of ``prefill`` tokens
    followed by one-token cached decode steps (compare with one full pass)."""
    cache = model.make_cache()
    outs = [model(mx.array(ids[:, :prefill]), cache=cache)]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(mx.array(ids[:, t : t + 1]), cache=cache))
    return np.array(mx.concatenate(outs, axis=1).astype(mx.float32))


def hc(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the hybridconv CLI in-process (no interpreter start-up): (exit code,
    stdout + stderr with whitespace collapsed, since Rich wraps long lines)."""
    import sys

    from hybridconv.cli import main

    monkeypatch.setattr(sys, "argv", ["hybridconv", *map(str, args)])
    monkeypatch.delenv("HYBRIDCONV_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # Rich: no wrapping or cut table cells
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, " ".join((out.out + "\n" + out.err).split())


@pytest.fixture
def signals_not_ignored():
    """SIGINT and SIGTERM not ignored during the test (the CLI installs its handlers only
    for signals that are not), even when the test runner runs as a background job, which
    inherits SIGINT ignored; restored after."""
    import signal

    ignored = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    yield
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)
