"""``inspect``: what a conversion would do, from config.json and safetensors
headers only (no tensor data is read)."""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import REPO_ID, remote_headers, resolve, source_folder
from .convert import DTYPE_LABELS, Plan, plan
from .safetensors_io import ITEMSIZE

QUANT_BITS = (8, 6, 5, 4, 3, 2)
QUANT_GROUP = 64


def inspect_plan(source: str, revision: str | None = None, dtype: str | None = None, allow_pickle: bool = False) -> Plan:
    """The plan of a local folder, or of a Hub repo from its config and remote headers.
    With ``allow_pickle``, a pickle-only checkpoint is read through ``torch.load(weights_only=True)``."""
    if allow_pickle:
        with source_folder(source, revision, allow_pickle=True) as src:
            return plan(src, dtype)
    if Path(source).expanduser().exists() or not REPO_ID.match(source):
        return plan(resolve(source, revision), dtype)
    src, index, download = remote_headers(source, revision)
    p = plan(src, dtype, index)
    p.download = download.describe() if download is not None else None
    return p


def size_estimates(p: Plan) -> dict:
    """Output bytes per float dtype (convert) and per width (quantize's own default
    plan: affine, group size :data:`QUANT_GROUP`, the architecture's policy)."""
    from .quant.modes import validate
    from .quant.plan import build_plan

    sizes: dict = {}
    for label, code in (("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")):
        entries = [(s.target, "F32" if s.keep_float32 else code, s.shape) for s in p.kept]
        sizes[label] = sum(math.prod(shape) * ITEMSIZE[dt] for _, dt, shape in entries) + _header_size(entries)
    for bits in QUANT_BITS:
        qp = build_plan(p, validate(bits, QUANT_GROUP, "affine"))
        entries = [e for t in qp.tensors for e in t.entries]
        sizes[f"{bits}-bit"] = qp.total_bits // 8 + _header_size(entries)
    return sizes


def _header_size(entries) -> int:
    """Bytes of the safetensors header for ``entries`` (the files also align each
    shard's data to the source's page offset: up to 4 KB more per shard)."""
    from .safetensors_io import header_bytes

    return len(header_bytes(entries, {"format": "mlx"}))


def describe(p: Plan) -> dict:
    """`hybridconv inspect --json`: a plan as a dict (architecture, layer schedule, rules,
    dropped tensors, size estimates, what mlx-lm does with the output)."""
    schedule = p.arch.schedule(p.config)
    rules = []
    # What each rule did to the tensors that reached it (under the name the rules
    # before it left), each source tensor once: a dropped tensor reaches no later
    # rule, a split one counts once.
    for i, rule in enumerate(p.rules):
        touched = list(dict.fromkeys(s.source for s in p.steps if i in s.matched))
        changed = sum(1 for _ in dict.fromkeys(s.source for s in p.steps if i in s.changed))
        rules.append(
            {
                "rule": rule.name,
                "description": rule.describe(),
                "matches": len(touched),
                "tensors": touched,
                "changes": changed,
            }
        )
    casts = list(dict.fromkeys(s.source for s in p.steps if "cast" in s.applied))
    consumed = {s.source for s in p.steps if "consume" in s.applied}
    rules.append(
        {
            "rule": "cast",
            "description": f"cast other floating tensors to {DTYPE_LABELS[p.dtype]}",
            "matches": len(casts),
            "tensors": casts,
            "changes": len(casts),
        }
    )
    return {
        "source": p.source.label,
        "source_revision": p.source.revision,
        "model_type": p.arch.model_type,
        "architecture": p.arch.title,
        "num_hidden_layers": p.config["num_hidden_layers"],
        "hidden_size": p.config["hidden_size"],
        "vocab_size": p.config["vocab_size"],
        "tie_word_embeddings": p.config["tie_word_embeddings"],
        "layers": [
            {"index": i, "kind": kind, "window": window}
            for i, (kind, window) in enumerate(schedule)
        ],
        "mlx_lm": mlx_lm_support(p.arch, p.config),
        "mlx_lm_code": mlx_lm_code(p.arch, p.config, p.source.path),
        "parameters": p.parameter_count,
        # Every weight the checkpoint holds (a wrapper's vision tower and mtp.* included,
        # FP8 scales not): what a model card counts; "parameters" is the converted model.
        "source_parameters": sum(t.numel for n, t in p.index.tensors.items() if n not in consumed),
        "source_tensors": len(p.index.tensors),
        "source_bytes": p.index.total_bytes,
        "source_shards": [s.name for s in p.index.shards],
        "output_dtype": DTYPE_LABELS[p.dtype],
        "rules": rules,
        "dropped": [{"tensor": s.source, "reason": s.dropped_because} for s in p.dropped],
        "download": p.download,  # a Hub repo not in the cache: what convert would fetch, in bytes
        "wrapper": ({"model_type": p.arch.wrapper.model_type, "title": p.arch.wrapper.title}
                    if p.arch.wrapper is not None else None),
        "source_quantization": ({**p.fp8.describe(), "dequantized": len(p.dequantized)} if p.fp8 else None),
        "estimated_output_bytes": size_estimates(p),
        "estimate_note": f"N-bit: what `hybridconv quantize --bits N` writes (affine, group size {QUANT_GROUP}; "
        f"scales and unquantized tensors in {DTYPE_LABELS[p.dtype]}, protected tensors in float32); "
        "weights and safetensors headers, within 4 KB per shard of page alignment",
    }


def mlx_lm_support(arch, config: dict) -> dict:
    """What mlx-lm does with the output of ``config`` (the architecture's statement,
    from the normalised config alone: converters/_mlx_lm.py)."""
    s = arch.mlx_lm_support(config)
    return {"status": s.status, "reason": s.reason, "line": s.line(), "measured_with": s.measured_with}


def _current(folder: Path, recorded: str | None) -> dict:
    """Whether a verification report still vouches for the folder's weights, as
    upload checks it (the weights hash; this reads the weight files): ``{"current":
    bool, "note": ...}``, the note saying what upload will say when not."""
    from .errors import HybridconvError
    from .hashing import weights_hash

    try:
        now = weights_hash(folder)
    except (OSError, HybridconvError) as exc:
        return {"current": False, "note": f"the weights cannot be read ({getattr(exc, 'message', exc)})"}
    if recorded == now:
        return {"current": True}
    return {"current": False,
            "note": f"the weights changed after verification (verified {str(recorded)[:19]}…, now {now[:19]}…): "
                    "upload refuses them; verify again"}


def mlx_lm_code(arch, config: dict, folder: Path | None = None) -> dict:
    """What mlx-lm users of the output run: ``auto`` (whether ``--mlx-lm-code auto``
    makes the output carry hybridconv's model, and why) and, for a folder that
    carries a model file already, ``carried`` (file, sha256, whether it is the
    file hybridconv wrote, why it was carried)."""
    from .mlx_lm_code import CARRIED_FILE, carried_code, decide

    carry, why = decide("auto", arch.mlx_lm_support(config))
    out = {"auto": {"carries": carry, "file": CARRIED_FILE if carry else None, "reason": why}}
    found = carried_code(folder) if folder is not None else None
    if found is not None:
        out["carried"] = found
    return out


def mlx_lm_code_line(info: dict) -> str:
    """One line for ``inspect``: the model file a folder carries, or what convert would do."""
    carried = info.get("carried")
    if carried:
        state = ("the file hybridconv wrote (conversion.json)" if carried["matches"]
                 else "NOT the file hybridconv wrote: verify and upload refuse it")
        return (f"carries {carried['file']} ({carried['sha256']}), {state}: mlx-lm runs it with "
                "--trust-remote-code")
    auto = info["auto"]
    if auto["carries"]:
        return (f"--mlx-lm-code auto carries hybridconv's model ({auto['file']}; run with --trust-remote-code): "
                f"{auto['reason']}")
    return f"--mlx-lm-code auto carries nothing: {auto['reason']}"


def describe_output(folder: Path) -> dict | None:
    """What a quantized hybridconv output is (it cannot be planned again: its
    weights are packed): architecture, quantization, size and verification, from
    config.json, conversion.json and verification.json. None if ``folder`` is not
    a quantized output."""
    import json

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        record = json.loads((folder / "conversion.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not cfg.get("quantization") or record.get("tool") != "hybridconv":
        return None
    quant = record.get("quantization") or {}
    verification = None
    try:
        rep = json.loads((folder / "verification.json").read_text())
        verification = {"verdict": rep.get("verdict"), "precision": (rep.get("model") or {}).get("precision"),
                        "kl_mean": ((rep.get("metrics") or {}).get("overall") or {}).get("kl_mean"),
                        "runtimes": {n: r.get("verdict") for n, r in (rep.get("runtimes") or {}).items()}}
        verification.update(_current(folder, (rep.get("model") or {}).get("weights_hash")))
    except (OSError, ValueError, AttributeError):
        pass
    weights = sorted(folder.glob("model*.safetensors"))

    def _output_mlx_lm(cfg: dict) -> dict | None:
        from .errors import HybridconvError
        from .loading import load_config

        try:
            arch, config = load_config(folder)
        except HybridconvError:
            return None
        return mlx_lm_support(arch, config)

    def _output_code() -> dict | None:
        from .errors import HybridconvError
        from .loading import load_config

        try:
            arch, config = load_config(folder)
        except HybridconvError:
            return None
        return mlx_lm_code(arch, config, folder)

    return {
        "path": str(folder),
        "kind": "quantized hybridconv output",
        "model_type": cfg.get("model_type"),
        "source": record.get("source"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "quantization": {k: v for k, v in cfg["quantization"].items() if not isinstance(v, (dict, bool))},
        "layers_with_own_settings": sum(1 for v in cfg["quantization"].values() if isinstance(v, (dict, bool))),
        "recipe": quant.get("recipe"),
        "bits_per_weight": quant.get("bits_per_weight"),
        "bytes": sum(f.stat().st_size for f in weights),
        "verification": verification,
        "mlx_lm": _output_mlx_lm(cfg),
        "mlx_lm_code": _output_code(),
        "next": "verify it (hybridconv verify), publish it (hybridconv upload); to convert again start from the float source",
    }
