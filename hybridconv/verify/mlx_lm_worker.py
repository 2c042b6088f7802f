"""verify's mlx-lm runtime, in its own process: load a folder as mlx-lm does and
compute the logits of verify's sequences, with no hybridconv model code.

Run as a script (``python mlx_lm_worker.py WORKDIR``), never imported by
hybridconv: :mod:`hybridconv.verify.mlx_lm_runtime` writes ``WORKDIR/request.json``
and the sequences (``ids-<s>.npy``), this writes ``logits-<s>.npy`` (float32
``[T, V]``) and ``result.json``, and prints one progress line per sequence.

What "as mlx-lm does" means here: ``mlx_lm.utils.load_model(folder,
trust_remote_code=...)`` (what ``mlx_lm.load``, ``mlx_lm.generate`` and
``mlx_lm.server`` call): mlx-lm's built-in model, or the model file the folder
carries (``model_file``) when the request trusts it; the caches come from
``mlx_lm.models.cache.make_prompt_cache``. Each sequence of ``T`` tokens runs as
verify runs hybridconv's model: a cached prefill of ``T - k`` tokens, then ``k``
single-token steps through the same caches (one plain forward when ``k = 0``).

hybridconv's model code cannot be used here: ``hybridconv.models``,
``hybridconv.converters`` and ``hybridconv.loading`` are blocked before mlx-lm is
imported (an import of them raises ImportError), so a carried file or mlx-lm
that tried would fail, not silently borrow it; ``result.json`` lists any
hybridconv module that was imported. Only two hybridconv modules may be, neither
a model: ``hybridconv`` itself (it loads an optimised BLAS for MLX's CPU
backend) and, on the float32 compute path, ``hybridconv.float32_compute`` (the
same float32 arithmetic as hybridconv's runtime). Without hybridconv importable
at all, the native path still runs (the tests do this). torch is not imported:
mlx-lm's models do not use it, and transformers (which mlx-lm imports) would
otherwise load it, half of this process's start-up.
"""

import json
import sys
import traceback
from pathlib import Path

BLOCKED = ("hybridconv.models", "hybridconv.converters", "hybridconv.loading")


def main(workdir: Path) -> int:
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]  # not verify's own modules
    request = json.loads((workdir / "request.json").read_text())
    if request.get("hybridconv_path"):
        sys.path.insert(0, request["hybridconv_path"])
    for name in BLOCKED:
        sys.modules[name] = None  # `import hybridconv.models` now raises ImportError
    # mlx-lm's models never use torch; importing mlx_lm imports transformers, which
    # would import torch (half of this process's start-up) unless it is absent.
    sys.modules.setdefault("torch", None)
    result = {"ok": False}
    try:
        import hybridconv.blas  # noqa: F401  (before mlx: the package loads the optimised BLAS)
    except ImportError:
        pass
    float32 = request["compute"] == "float32"
    stage = "load"
    try:
        import importlib.metadata as md

        import mlx.core as mx
        import numpy as np
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        result["mlx_lm_version"] = md.version("mlx-lm")
        model, config = load_model(Path(request["folder"]), trust_remote_code=request["trust_remote_code"])
        cls = type(model)
        result["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
        result["model_file"] = config.get("model_file")
        result["carried_code_ran"] = bool(config.get("model_file")) and cls.__module__ == "custom_model"
        if float32:
            from hybridconv.float32_compute import to_float32_compute

            to_float32_compute(model, request["upcast"])
            if getattr(model, "activation_dtype", None) is not None:
                # a hybridconv model (the carried file): float32 activations, as
                # hybridconv.load(compute="float32") sets them
                model.activation_dtype = mx.float32
        stage = "run"
        k_max = int(request["decode_steps"])
        n = int(request["sequences"])
        for s in range(n):
            ids = np.load(workdir / f"ids-{s}.npy")[None]
            T = ids.shape[1]
            k = max(0, min(k_max, T - 1))
            if k == 0:
                rows = [np.array(model(mx.array(ids)).astype(mx.float32))]
            else:
                cache = make_prompt_cache(model)
                rows = [np.array(model(mx.array(ids[:, : T - k]), cache=cache).astype(mx.float32))]
                for t in range(T - k, T):
                    rows.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache).astype(mx.float32)))
            np.save(workdir / f"logits-{s}.npy", np.concatenate(rows, axis=1)[0])
            print(f"sequence {s + 1}/{n}", flush=True)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001  (whatever mlx-lm raises is what its users see)
        text = " ".join(str(exc).split())
        result.update(stage=stage, message=f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__,
                      traceback=traceback.format_exc()[-4000:])
    result["hybridconv_modules"] = sorted(m for m, v in sys.modules.items() if m.startswith("hybridconv") and v)
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
