"""The model card (``README.md``) of a converted folder.

Rendered from :file:`card_template.md` (or a user-edited copy passed with
``--card-template``: the ``{placeholders}`` are filled, everything else is kept)
with YAML front matter per Hub conventions: ``library_name: mlx``,
``base_model`` (when the source is a Hub repo), ``base_model_relation:
quantized`` for quantized weights, ``tags`` (``mlx``, the architecture,
``hybridconv``), and ``license`` / ``language`` copied from the source's card.

The "Runtimes" section comes from the verification report: one row per runtime
that ran the weights (hybridconv, mlx-lm) with its verdict, mean KL and the
model code that ran (mlx-lm's own model, or the model file the folder carries,
run with ``--trust-remote-code``). The "Use with mlx-lm" snippet appears only
where mlx-lm passed, with ``--trust-remote-code`` (and what that runs) where
what passed is the carried file; otherwise a plain warning says what mlx-lm
does with these weights (cannot load them, or computes another function, and
why) and points to hybridconv.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import __version__
from ..checkpoint import read_front_matter  # noqa: F401  (the card reads the source card's front matter)
from ..errors import UsageError

TEMPLATE = Path(__file__).with_name("card_template.md")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


MLX_LM_SNIPPET = """## Use with mlx-lm

```sh
pip install mlx-lm
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{repo_id}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```"""


def _runtimes(report: dict | None) -> dict:
    """{runtime: result} of a verification report (schema /2), or hybridconv's
    alone from an older report."""
    if not report:
        return {}
    runs = report.get("runtimes")
    if isinstance(runs, dict) and runs:
        return runs
    return {"hybridconv": {"runtime": "hybridconv", "verdict": report.get("verdict"), "metrics": report.get("metrics"),
                           "version": (report.get("tool") or {}).get("version")}}


def _widths(quant: dict) -> list[int]:
    """The widths the quantized weights are stored at, narrowest first, from the
    conversion record (its plan rows; the base width for older records)."""
    rows = [r.get("bits") for r in quant.get("plan", []) if r.get("decision") == "quantize"]
    widths = sorted({b for b in rows if isinstance(b, int)} | set(quant.get("widths") or []))
    return widths or [quant["base"]["bits"]]


MLX_LM_CARRIED_SNIPPET = """## Use with mlx-lm

This repository carries hybridconv's own implementation of the model, `{file}`
(`{sha256}`), and `config.json` names it (`model_file`): mlx-lm runs it only when
you pass `--trust-remote-code` (`trust_remote_code=True` in Python). It is the code
verified below, made by hybridconv {version} from its model modules, readable in
one file; it imports only mlx, mlx_lm and the Python standard library (no network,
no file access). Why it is carried: {why}.

```sh
pip install mlx-lm
mlx_lm.generate --model {repo_id} --trust-remote-code --prompt "Hello"
mlx_lm.server --model {repo_id} --trust-remote-code
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{repo_id}", trust_remote_code=True)
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```"""


def _model_code(r: dict) -> str:
    """The Runtimes table's "model code" cell: what ran in that runtime."""
    if r.get("runtime") == "hybridconv" or "loader" not in r:
        return "hybridconv.models" if r.get("runtime", "hybridconv") == "hybridconv" else "-"
    code = r.get("model_code") or {}
    if r.get("trust_remote_code") and code.get("source") == "carried":
        return f"{code.get('file')} (carried; --trust-remote-code)"
    if code.get("class"):
        return f"mlx-lm's own ({code['class'].rsplit('.', 1)[0]})"
    return "mlx-lm's own"


def runtimes_section(report: dict | None, repo_id: str, record: dict | None = None) -> tuple[str, str]:
    """(the Runtimes table, the mlx-lm section: its usage snippet if mlx-lm passed —
    with ``--trust-remote-code`` when what passed is the model file the folder
    carries — else a warning). ``record``: the folder's conversion.json."""
    runs = _runtimes(report)
    rows = []
    for name, r in runs.items():
        kl = ((r.get("metrics") or {}).get("overall") or {}).get("kl_mean")
        rows.append(f"| {name} | {r.get('version') or '-'} | {r.get('verdict') or '-'} | "
                    f"{'-' if kl is None else f'{kl:.3g}'} | {_model_code({'runtime': name, **r})} |")
    if "mlx-lm" not in runs:
        rows.append("| mlx-lm | - | not checked | - | - |")
    table = "\n".join(["| runtime | version | verdict | KL mean | model code |", "|---|---|---|---|---|", *rows])
    r = runs.get("mlx-lm")
    if r and r.get("verdict") == "pass" and r.get("trust_remote_code"):
        code = r.get("model_code") or {}
        carried = (record or {}).get("mlx_lm_code") or {}
        values = {"{repo_id}": repo_id, "{file}": str(code.get("file")), "{sha256}": str(code.get("sha256")),
                  "{version}": str(carried.get("hybridconv_version") or __version__),
                  "{why}": str(carried.get("reason") or "mlx-lm's own model cannot run these weights right")}
        snippet = MLX_LM_CARRIED_SNIPPET
        for key, value in values.items():
            snippet = snippet.replace(key, value)
        return table, snippet
    if r and r.get("verdict") == "pass":
        snippet = MLX_LM_SNIPPET.replace("{repo_id}", repo_id)
        if r.get("note"):  # within a lossy precision's gates, yet another function
            snippet += f"\n\n> **Note:** mlx-lm {r['note']}. hybridconv (below) computes the original function."
        return table, snippet
    if r is None:
        what = "mlx-lm was not checked against the reference for these weights"
    elif r.get("verdict") in ("cannot load", "cannot run", "not run"):
        what = f"mlx-lm {r['verdict']} these weights ({r.get('message') or 'no message'})"
    else:
        kl = ((r.get("metrics") or {}).get("overall") or {}).get("kl_mean")
        what = ("mlx-lm loads these weights but computes a different function"
                + (f" (mean KL {kl:.3g} from the reference)" if kl is not None else ""))
    why = ((r or {}).get("expected") or {}).get("reason")
    if why and (r or {}).get("verdict") != "pass":
        what += f": {why}"
    warning = (f"> **Warning: not for mlx-lm.** {what}. Load them with hybridconv (below), "
               "which computes the original model's function.")
    if r is not None and not r.get("trust_remote_code"):
        warning += (" (Converted with `--mlx-lm-code auto`, the default, the weights would carry "
                    "hybridconv's model, which mlx-lm runs with `--trust-remote-code`.)")
    return table, "## mlx-lm\n\n" + warning


def render_card(out: Path, repo_id: str | None, template: Path | None = None, unverified: bool = False) -> str:
    """The model card (README.md) of an output folder: Hub front matter, how to run it,
    how it was made, the verification and runtimes tables, provenance."""
    out = Path(out)
    config = _json(out / "config.json") or {}
    record = _json(out / "conversion.json") or {}
    report = _json(out / "verification.json")
    quant = record.get("quantization")
    source = record.get("source") or "unknown"
    source_is_repo = "/" in source and not Path(source).exists() and not source.startswith("/")
    model_type = config.get("model_type", "unknown")

    front: dict = {"library_name": "mlx", "pipeline_tag": "text-generation"}
    if source_is_repo:
        front["base_model"] = source
        if quant:
            front["base_model_relation"] = "quantized"
    tags = ["mlx", model_type, "hybridconv"]
    widths = _widths(quant) if quant else []
    if quant:
        if quant.get("recipe", "uniform") != "uniform":
            tags.append(quant["recipe"])
        # the width tag (last): the narrowest width the weights are stored at
        tags.append(f"{widths[0]}-bit" if quant["base"]["mode"] == "affine" else quant["base"]["mode"])
    if unverified:
        tags.append("unverified")
    front["tags"] = tags
    for key in ("license", "language"):
        value = (record.get("source_card") or {}).get(key)
        if value:
            front[key] = value

    conv = [("dtype", record.get("dtype", "?"))]
    if quant:
        base = quant["base"]
        conv += [
            ("quantization", f"{base['mode']}, {'/'.join(map(str, widths))} bits, group size {base['group_size']}"),
            ("recipe", quant.get("recipe", "uniform")),
            ("bits per weight", f"{quant['bits_per_weight']:.3f}"),
        ]
    conv.append(("rules", "; ".join(record.get("rules", [])) or "-"))
    kept: dict[str, int] = {}
    if quant:
        for row in quant.get("plan", []):
            if row["decision"] != "quantize":
                kept[row["reason"]] = kept.get(row["reason"], 0) + 1
    else:
        for t in record.get("tensors", []):
            for action in t.get("actions", []):
                if action.startswith("keep in float32"):
                    kept[action] = kept.get(action, 0) + 1
    kept_table = (
        _table([(why, str(n)) for why, n in kept.items()], ("why", "tensors"))
        if kept
        else "None beyond the output dtype: nothing is quantized."
    )

    if report is None:
        verification = "**Not verified.** These weights were published without a verification report."
    else:
        m = (report.get("metrics") or {}).get("overall") or {}
        rows = [
            ("reference", f"{report['reference']['implementation']} ({report['reference']['dtype']})"),
            ("inputs", f"{report['inputs']['sequences']} sequence(s), {report['inputs']['tokens']} tokens"),
        ]
        for key in ("kl_mean", "kl_p99", "top1_agreement", "top5_overlap", "max_abs_logit_diff", "perplexity_ratio"):
            if key in m:
                rows.append((key, f"{m[key]:.4g}"))
        for c in report.get("checks", []):
            rows.append((f"gate {c['gate']}", f"{c['value']:.4g} vs {c['threshold']:.4g}: {'pass' if c['passed'] else 'FAIL'}"))
        rows.append(("verdict", f"**{report['verdict']}**"))
        rows.append(("weights hash", f"`{report['model']['weights_hash']}`"))
        verification = _table(rows, ("", ""))
        if unverified:
            verification = "**Published unverified**: the report below does not vouch for these weights.\n\n" + verification

    versions = dict((report or {}).get("libraries", {}))
    versions_text = ", ".join([f"hybridconv {__version__}"] + [f"{k} {v}" for k, v in versions.items()])
    if quant:
        b = quant["base"]
        variant = (f"{b['mode']} {'/'.join(map(str, widths))}-bit quantized" if b["mode"] == "affine"
                   else f"{b['mode']} quantized")
        if quant.get("recipe", "uniform") != "uniform":
            variant += f" ({quant['recipe']}: the sensitive roles at {widths[-1]} bits)"
    else:
        variant = f"in {record.get('dtype', 'float')}"
    runtimes_table, mlx_lm_section = runtimes_section(report, repo_id or out.name, record)
    values = {
        "runtimes_table": runtimes_table,
        "mlx_lm_section": mlx_lm_section,
        "title": repo_id or out.name,
        "repo_id": repo_id or out.name,
        "source": source if source_is_repo else f"{Path(source).name} (a local folder)",
        "source_url": f"https://huggingface.co/{source}" if source_is_repo else "#provenance",
        "source_revision": record.get("source_revision") or "unknown (local folder)",
        "variant_description": variant,
        "tool_version": __version__,
        "architecture": config.get("architectures", ["?"])[0] if config.get("architectures") else "?",
        "model_type": model_type,
        "conversion_table": _table(conv),
        "kept_table": kept_table,
        "verification_section": verification,
        "versions": versions_text,
        "unverified_banner": "> **Warning: unverified.** These weights were published without a passing verification.\n\n"
        if unverified
        else "",
    }
    path = Path(template) if template else TEMPLATE
    try:
        body = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the card template ({exc.strerror or exc})") from None
    try:
        body = body.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(
            f"{path}: bad placeholder in the card template ({exc})",
            f"available placeholders: {', '.join('{' + k + '}' for k in values)}; write literal braces as {{{{ }}}}",
        ) from None
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body
