"""Runs converted folders through mlx-lm in a process where ``import hybridconv``
fails: what a user who has only mlx-lm gets. Used by tests/test_mlx_lm_code.py,
one process for many folders (mlx-lm's start-up is most of the cost).

``python mlx_lm_harness.py SPEC.json`` where SPEC is::

    {"shadow": DIR,            # put first on sys.path: DIR/hybridconv/__init__.py raises ImportError
     "cases": [{"name", "folder", "ids": FILE.npy [B, T], "steps": k, "out": FILE.npz}],
     "generate": [{"name", "folder", "prompt": TEXT, "max_tokens": N, "ids": [..]}]}

For each case: the folder opened WITHOUT trust_remote_code (its logits if it
opens, else mlx-lm's message), then opened as users of a carried model open it
(``trust_remote_code=True``): the logits of one full forward, and of the prompt
cache path — the first ``T - k`` tokens prefilled through ``make_prompt_cache`` in
chunks (as ``mlx_lm.cache_prompt`` does), the cache saved with
``save_prompt_cache`` and read back with ``load_prompt_cache`` (which rebuilds
mlx-lm's cache classes by name), then ``k`` single-token steps. For each
``generate`` entry: ``mlx_lm.generate``'s command line (its ``main``, as
``python -m mlx_lm generate`` runs it) with ``--trust-remote-code``, its printed
output captured, and the greedy token ids of ``stream_generate`` on ``ids``.
Results go to ``SPEC.json.result``.

torch is kept out (mlx-lm's models never use it; transformers would import it).
"""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path


def main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
    sys.path.insert(0, spec["shadow"])
    sys.modules.setdefault("torch", None)
    out: dict = {"hybridconv_importable": True}
    try:
        import hybridconv  # noqa: F401
    except ImportError as exc:
        out["hybridconv_importable"] = False
        out["hybridconv_import_error"] = str(exc)
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
    from mlx_lm.utils import load_model

    results = []
    for case in spec.get("cases", []):
        rec: dict = {"name": case["name"]}
        arrays = {}
        folder = Path(case["folder"])
        ids = np.load(case["ids"])
        try:
            untrusted, _ = load_model(folder)
            arrays["untrusted"] = np.array(untrusted(mx.array(ids)).astype(mx.float32))
            rec["untrusted"] = "opened"
            del untrusted
        except Exception as exc:  # noqa: BLE001  (what mlx-lm says is the result)
            rec["untrusted"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        try:
            model, config = load_model(folder, trust_remote_code=True)
            rec["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
            rec["model_file"] = config.get("model_file")
            arrays["full"] = np.array(model(mx.array(ids)).astype(mx.float32))
            T, k = ids.shape[1], int(case["steps"])
            cache = make_prompt_cache(model)
            for a in range(0, T - k, 5):  # prefill in chunks, as cache_prompt does
                model(mx.array(ids[:, a : min(a + 5, T - k)]), cache=cache)
                mx.eval([c.state for c in cache])
            rec["cache_classes"] = [type(c).__name__ for c in cache]
            path = Path(case["out"]).with_suffix(".cache.safetensors")
            save_prompt_cache(str(path), cache, {"folder": str(folder)})
            loaded = load_prompt_cache(str(path))
            rec["reloaded_classes"] = [type(c).__name__ for c in loaded]
            steps = [np.array(model(mx.array(ids[:, t : t + 1]), cache=loaded).astype(mx.float32))
                     for t in range(T - k, T)]
            arrays["steps"] = np.concatenate(steps, axis=1)
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        np.savez(case["out"], **arrays)
        results.append(rec)
    out["cases"] = results

    gens = []
    for g in spec.get("generate", []):
        rec = {"name": g["name"]}
        try:
            import importlib

            from mlx_lm.generate import stream_generate

            gen_cli = importlib.import_module("mlx_lm.generate")  # the module (mlx_lm.generate is also a function)
            from mlx_lm.utils import load

            argv = ["mlx_lm.generate", "--model", g["folder"], "--trust-remote-code", "--prompt", g["prompt"],
                    "--max-tokens", str(g["max_tokens"]), "--ignore-chat-template"]
            buf = io.StringIO()
            saved, sys.argv = sys.argv, argv
            try:
                with contextlib.redirect_stdout(buf):
                    gen_cli.main()
            finally:
                sys.argv = saved
            rec["printed"] = buf.getvalue()
            model, tokenizer = load(g["folder"], trust_remote_code=True)
            rec["tokens"] = [r.token for r in stream_generate(model, tokenizer, g["ids"], max_tokens=g["max_tokens"])]
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        gens.append(rec)
    out["generate"] = gens
    out["hybridconv_modules"] = sorted(m for m, v in sys.modules.items() if m.startswith("hybridconv") and v)
    Path(str(spec_path) + ".result").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
