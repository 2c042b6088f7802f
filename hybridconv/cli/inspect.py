"""``hybridconv inspect``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..inspect import describe, describe_output, inspect_plan, mlx_lm_code_line
from . import app, console
from .options import AllowPickleOpt, DtypeOpt, JsonOpt, RevisionOpt, SourceArg
from .render import human_bytes


@app.command("inspect")
def inspect_cmd(
    source: SourceArg,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Show what a conversion would do, reading only config.json and safetensors headers.

    For a Hub repo id that is not in the local cache, the headers are fetched with HTTP
    range requests: no weights are downloaded; it says what convert would download, in bytes.

    Architecture, layer schedule (index -> mamba / attention / recurrent, with attention
    windows), parameter count, what each rule does to which tensors, and the estimated output
    size per dtype and quantization width. Fails like convert would (exit 2) when the ledger
    does not balance. Rules name tensors in words (* any text, N a number, {a,b} one of, … the
    source name's own prefix kept).

    A quantized hybridconv output is shown for what it is, its verification included: "stale"
    when its weights changed since (what upload will say; this reads the weight files).
    """
    done = describe_output(Path(source)) if Path(source).is_dir() else None
    if done is not None:  # a quantized output: say what it is, it cannot be planned again
        if json_out:
            console.print_json(json.dumps(done))
            return
        t = Table(title=f"{done['kind']} — {done['path']}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        for key in ("model_type", "source", "num_hidden_layers", "recipe", "bits_per_weight"):
            t.add_row(key, str(done[key]))
        t.add_row("quantization", ", ".join(f"{k} {v}" for k, v in done["quantization"].items())
                  + (f" ({done['layers_with_own_settings']} layers with their own settings)" if done["layers_with_own_settings"] else ""))
        t.add_row("weights", human_bytes(done["bytes"]))
        v = done["verification"]
        if not v:
            verdict = "never verified"
        elif not v.get("current", True):  # what upload will say: the report is not of these weights
            verdict = f"[red]stale[/]: {escape(v['note'])} (the report said {v['verdict']})"
        else:
            verdict = (f"{v['verdict']} ({v['precision']}, KL mean {v['kl_mean']:.3g})"
                       if v.get("kl_mean") is not None else f"{v['verdict']}")
        t.add_row("verification", verdict)
        measured = (v or {}).get("runtimes", {}).get("mlx-lm")
        if done.get("mlx_lm") or measured:
            t.add_row("mlx-lm", (f"verified: {measured}; " if measured else "") + (done["mlx_lm"] or {}).get("line", ""))
        if done.get("mlx_lm_code"):
            t.add_row("mlx-lm code", escape(mlx_lm_code_line(done["mlx_lm_code"])))
        t.add_row("next", done["next"])
        console.print(t)
        return
    info = describe(inspect_plan(source, revision, dtype.value if dtype else None, allow_pickle))
    if json_out:
        console.print_json(json.dumps(info))
        return
    head = Table(title=f"{info['architecture']} — {info['source']}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model_type", info["model_type"])
    head.add_row("parameters", f"{info['parameters']:,}" + (
        f" (the checkpoint holds {info['source_parameters']:,}: what it holds beyond the converted model is dropped)"
        if info.get("source_parameters", info["parameters"]) != info["parameters"] else ""))
    head.add_row("hidden / vocab", f"{info['hidden_size']} / {info['vocab_size']}")
    head.add_row("tied embeddings", str(info["tie_word_embeddings"]))
    own = "its built-in model " if info["mlx_lm_code"].get("carried") else ""  # the folder carries another
    head.add_row("mlx-lm", own + escape(info["mlx_lm"]["line"]) + (
        f" [dim](known for mlx-lm {info['mlx_lm']['measured_with']}; `hybridconv verify` measures it)[/]"
        if info["mlx_lm"].get("measured_with") else ""))
    head.add_row("mlx-lm code", escape(mlx_lm_code_line(info["mlx_lm_code"])))
    head.add_row("source", f"{info['source_tensors']} tensors, {human_bytes(info['source_bytes'])}, "
                 f"{len(info['source_shards'])} shard(s)")
    if info.get("wrapper"):
        head.add_row("wrapper", f"{info['wrapper']['title']} ({info['wrapper']['model_type']}): its language model "
                     f"is converted; {len(info['dropped'])} tensors dropped (see the rules)")
    q = info.get("source_quantization")
    if q:
        block = "x".join(map(str, q["weight_block_size"])) if q["weight_block_size"] else "per tensor"
        head.add_row("source quantization", f"FP8 block-scaled ({q.get('fmt') or 'e4m3'}, blocks {block}): "
                     f"{q['dequantized']} weights dequantized in float32, then {info['output_dtype']}")
    if info.get("download"):
        d = info["download"]
        skipped = d["not_fetched"]
        head.add_row("download", f"{len(d['files'])} files, {human_bytes(d['bytes'])} ({d['note']})" + (
            f"; not fetched: {', '.join(f['name'] for f in skipped[:4])}{' …' if len(skipped) > 4 else ''} "
            f"({human_bytes(sum(f['bytes'] for f in skipped))})" if skipped else ""))
    console.print(head)

    layers = Table(title="layer schedule")
    layers.add_column("layer", justify="right")
    layers.add_column("kind")
    layers.add_column("attention window")
    for row in info["layers"]:
        window = "" if row["kind"] != "attention" else (str(row["window"]) if row["window"] else "full")
        layers.add_row(str(row["index"]), row["kind"], window)
    console.print(layers)

    rules = Table(title=f"rules (output dtype {info['output_dtype']})")
    rules.add_column("rule")
    rules.add_column("what it does")
    rules.add_column("matches", justify="right")
    rules.add_column("changes", justify="right")
    for r in info["rules"]:
        rules.add_row(r["rule"], r["description"], str(r["matches"]), str(r["changes"]))
    console.print(rules)

    sizes = Table(title="estimated output size")
    sizes.add_column("format")
    sizes.add_column("size", justify="right")
    for k, v in info["estimated_output_bytes"].items():
        sizes.add_row(k, human_bytes(v))
    console.print(sizes)
    console.print(f"[dim]{info['estimate_note']}[/]")
