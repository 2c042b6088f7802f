#!/usr/bin/env python
"""Train three small hybrid language models with transformers' own classes, for
measuring quantization on *trained* weights (random weights have no outlier
channels and near-uniform outputs: they cannot tell a good 4-bit method from a
plain one).

Text every machine with Python has: the standard library's own sources (code,
comments and docstrings) of the Python running this script, ``*.py`` outside
``test``/``tests``/``idlelib``/``site-packages``, in sorted path order. Split by
file: a file is held out when ``crc32(relative path) % 10 == 0`` (about a tenth
of the files; held-out text is never trained on). A byte-level BPE tokenizer
(``tokenizers``, vocabulary :data:`VOCAB`) is trained on the training files and
written with every checkpoint.

Models (transformers' classes, the reference implementations hybridconv verifies
against), hidden size 128 so that every projection's input fits group size 64:

* ``granitemoehybrid``: Mamba-2 + attention + MoE (4 experts, top 2) + shared MLP;
* ``qwen3_5_text``: gated DeltaNet + gated attention, SwiGLU MLP, untied head;
* ``recurrent_gemma``: RG-LRU recurrent blocks + local attention, tied head.

Deterministic: seeded (torch, numpy, data order), fixed steps, fixed thread count,
``torch.use_deterministic_algorithms(True)``. Each checkpoint folder (Hugging Face
layout, ``model.safetensors`` in bfloat16, ``config.json``, tokenizer files) gets
a ``training.json``: the final training loss (mean of the last 50 steps), the
held-out perplexity of the *saved* (bf16) weights in float32, the corpus and its
split, the hyper-parameters, versions and wall time.

Usage: nice python scripts/train_tiny.py [--out tests/data/trained] [--models ...]
       [--steps N] [--threads 2]
Also writes ``calibration.txt`` (training text, for calibrated quantization) and
``heldout.txt`` (held-out text, for perplexity) in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1024
SEQ_LEN = 128
BATCH = 8
SKIP_DIRS = ("test", "tests", "idlelib", "site-packages", "__pycache__")
TRAIN_CHARS = 2_500_000  # of training text tokenised (the steps use a part of it)
CALIBRATION_CHARS = 60_000  # written to calibration.txt (from the training split)
HELDOUT_CHARS = 400_000  # of held-out text written to heldout.txt

# Per model: config (transformers' keys), steps, peak learning rate.
MODELS = {
    "granitemoehybrid": dict(
        steps=300,
        lr=3e-3,
        config=dict(
            model_type="granitemoehybrid",
            architectures=["GraniteMoeHybridForCausalLM"],
            hidden_size=128,
            num_hidden_layers=4,
            layer_types=["mamba", "attention", "mamba", "mamba"],
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            shared_intermediate_size=256,
            num_local_experts=4,
            num_experts_per_tok=2,
            mamba_n_heads=8,
            mamba_d_head=32,
            mamba_d_state=32,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=64,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
            position_embedding_type="rope",
            rope_theta=10000.0,
            embedding_multiplier=1.0,
            attention_multiplier=1.0 / 32 ** 0.5,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
        ),
    ),
    "qwen3_5_text": dict(
        steps=300,
        lr=3e-3,
        config=dict(
            model_type="qwen3_5_text",
            architectures=["Qwen3_5ForCausalLM"],
            hidden_size=128,
            num_hidden_layers=4,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            tie_word_embeddings=False,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
        ),
    ),
    "recurrent_gemma": dict(
        steps=300,
        lr=3e-3,
        config=dict(
            model_type="recurrent_gemma",
            architectures=["RecurrentGemmaForCausalLM"],
            hidden_size=128,
            num_hidden_layers=4,
            block_types=["recurrent", "recurrent", "attention"],
            num_attention_heads=4,
            num_key_value_heads=1,
            lru_width=128,
            intermediate_size=512,
            attention_window_size=128,
            conv1d_width=4,
            logits_soft_cap=30.0,
            hidden_activation="gelu_pytorch_tanh",
            partial_rotary_factor=0.5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
        ),
    ),
}


# --- corpus --------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(Path(dirpath) / f)
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 10 == 0


def corpus() -> dict:
    """Training and held-out text of the standard library (module docstring)."""
    root, files = stdlib_files()
    train, held, n_train, n_held = [], [], 0, 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if is_heldout(rel):
            held.append(text)
            n_held += 1
        else:
            train.append(text)
            n_train += 1
    return {
        "root": str(root),
        "train": "\n\n".join(train),
        "heldout": "\n\n".join(held),
        "train_files": n_train,
        "heldout_files": n_held,
    }


# --- tokenizer -----------------------------------------------------------------


def train_tokenizer(text: str, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 100_000
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(str(folder))
    return fast


def encode(tok, text: str) -> np.ndarray:
    chunk = 200_000
    ids: list[int] = []
    for i in range(0, len(text), chunk):
        ids.extend(tok(text[i : i + chunk], add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


# --- models --------------------------------------------------------------------


def build(name: str, vocab: int):
    import transformers

    spec = MODELS[name]
    cfg = dict(spec["config"], vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures")
    config_cls = {
        "granitemoehybrid": transformers.GraniteMoeHybridConfig,
        "qwen3_5_text": transformers.Qwen3_5TextConfig,
        "recurrent_gemma": transformers.RecurrentGemmaConfig,
    }[model_type]
    model_cls = {
        "granitemoehybrid": transformers.GraniteMoeHybridForCausalLM,
        "qwen3_5_text": transformers.Qwen3_5ForCausalLM,
        "recurrent_gemma": transformers.RecurrentGemmaForCausalLM,
    }[model_type]
    config = config_cls(**cfg)
    return model_cls(config)


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))


def heldout_perplexity(model, ids: np.ndarray, windows: int = 48, length: int = 256) -> tuple[float, int]:
    """Perplexity over ``windows`` consecutive windows of ``length`` held-out tokens
    (the first ``windows * length`` tokens; every position but each window's first predicted)."""
    import torch

    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = torch.from_numpy(ids[w * length : (w + 1) * length][None])
            if x.shape[1] < 2:
                break
            logits = model(x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll += float(loss)
            n += x.shape[1] - 1
    return float(np.exp(nll / n)), n


def train_one(name: str, out: Path, tok, train_ids: np.ndarray, held_ids: np.ndarray, corpus_info: dict,
              steps: int | None, seed: int, threads: int) -> dict:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    spec = MODELS[name]
    steps = steps or spec["steps"]
    model = build(name, len(tok))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(train_ids) - SEQ_LEN - 1, size=(steps, BATCH))
    losses = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, spec["lr"])
        batch = np.stack([train_ids[s : s + SEQ_LEN + 1] for s in starts[step]])
        x = torch.from_numpy(batch[:, :-1])
        y = torch.from_numpy(batch[:, 1:])
        logits = model(x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            print(f"  {name} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    train_seconds = time.time() - t0
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    # held-out perplexity of the saved weights (bf16), computed in float32
    import transformers

    saved = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ppl, n_tokens = heldout_perplexity(saved, held_ids)
    record = {
        "model_type": MODELS[name]["config"]["model_type"],
        "parameters": int(params),
        "saved_dtype": "bfloat16",
        "steps": steps,
        "batch": BATCH,
        "sequence_length": SEQ_LEN,
        "tokens_seen": steps * BATCH * SEQ_LEN,
        "peak_learning_rate": spec["lr"],
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1), warm-up then cosine to 10 %, grad clip 1.0",
        "seed": seed,
        "threads": threads,
        "train_loss_final": float(np.mean(losses[-50:])),
        "train_loss_first": float(np.mean(losses[:10])),
        "heldout_perplexity": ppl,
        "heldout_tokens": n_tokens,
        "heldout_evaluation": "first 48 windows of 256 held-out tokens, float32, the saved bf16 weights",
        "train_seconds": round(train_seconds, 1),
        "corpus": {k: v for k, v in corpus_info.items() if k not in ("train", "heldout")},
        "tokenizer": f"byte-level BPE, {len(tok)} tokens, trained on the training split (tokenizers)",
        "versions": _versions(),
    }
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "trained")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="training steps per model [default: each model's]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = corpus()
    train_text = info["train"][:TRAIN_CHARS]
    print(f"corpus: {info['train_files']} training files ({len(info['train'])} chars), "
          f"{info['heldout_files']} held-out files ({len(info['heldout'])} chars) from {info['root']}", flush=True)
    tok_dir = args.out / "_tokenizer"
    tok = train_tokenizer(train_text, tok_dir)
    train_ids = encode(tok, train_text)
    held_text = info["heldout"][:HELDOUT_CHARS]
    held_ids = encode(tok, held_text)
    (args.out / "calibration.txt").write_text(info["train"][-CALIBRATION_CHARS:], encoding="utf-8")
    (args.out / "heldout.txt").write_text(held_text, encoding="utf-8")
    print(f"tokenizer: {len(tok)} tokens; {len(train_ids)} training tokens, {len(held_ids)} held-out tokens "
          f"({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for name in args.models:
        rec = train_one(name, args.out, tok, train_ids, held_ids, info, args.steps, args.seed, args.threads)
        summary[name] = {k: rec[k] for k in ("parameters", "train_loss_final", "heldout_perplexity", "train_seconds")}
        print(json.dumps({name: summary[name]}), flush=True)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
