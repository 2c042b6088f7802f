"""``release PLAN``: convert -> quantize -> verify -> upload for every variant.

Plan schema (TOML shown; YAML with the same keys works too)::

    name = "plamo-2-1b-mlx"              # optional; default: the file's stem

    [source]
    repo_id = "pfnet/plamo-2-1b"         # or: path = "checkpoints/plamo-2-1b" (relative to the plan)
    revision = "main"                    # optional, repo ids only

    [verify]                             # inputs and default gates for every variant
    random_tokens = 256                  # or prompts = [...], text_files = [...]
    num_sequences = 2
    seed = 0
    decode_steps = 8
    gates = { max_kl_mean = 0.02 }       # optional overrides (see `verify --help`)

    [upload]                             # optional
    private = false
    revision = "main"                    # branch

    [[variants]]
    name = "bf16"
    dtype = "bfloat16"                   # a float variant: convert
    repo_id = "my-org/plamo-2-1b-mlx-bf16"
    require_runtimes = ["mlx-lm"]        # optional: fail (and do not upload) unless mlx-lm computes it too
    mlx_lm_code = "auto"                 # optional (also at the top of the plan, for every variant): auto | always | never

    [[variants]]
    name = "4bit"
    bits = 4                             # a quantized variant: quantize
    group_size = 64                      # optional; also mode, bits_for, keep, dtype
    repo_id = "my-org/plamo-2-1b-mlx-4bit"
    gates = { max_kl_mean = 0.2 }        # optional, per variant

    [[variants]]
    name = "mixed"
    recipe = "mixed-4-6"                 # also a quantized variant: the recipe sets the widths
    repo_id = "my-org/plamo-2-1b-mlx-mixed-4-6"   # (so `bits` is refused with it, as on the CLI)

The PyTorch reference runs once (whole, or one block at a time when the model
does not fit: see ``verify``); its logits (and block outputs) are stored in
``WORKDIR/reference.safetensors`` and every variant is verified against that
file (memory-mapped), by every runtime installed (hybridconv, and mlx-lm when present: the
card says what mlx-lm does with the weights); ``require_runtimes`` makes a
runtime's failure the variant's. Each step records a hash of what it was computed from in
``WORKDIR/release-state.json``; a rerun skips a step whose hash and output are
unchanged. A variant whose verification fails is never uploaded, whatever the
others did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__, interrupt
from ..errors import EXIT_HUB, HybridconvError, UsageError

VARIANT_KEYS = {"name", "dtype", "bits", "group_size", "mode", "recipe", "bits_for", "keep", "repo_id", "gates",
                "require_runtimes", "mlx_lm_code"}
GATE_KEYS = {"max_kl_mean", "max_kl_p99", "min_top1", "min_top5", "max_block_error"}
VERIFY_KEYS = {"random_tokens", "num_sequences", "seed", "prompts", "text_files", "decode_steps", "gates", "ref_dtype"}


@dataclass
class Variant:
    name: str
    repo_id: str | None = None
    dtype: str | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    recipe: str | None = None
    bits_for: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    gates: dict = field(default_factory=dict)
    require_runtimes: list[str] = field(default_factory=list)
    mlx_lm_code: str = "auto"  # --mlx-lm-code: whether the output carries hybridconv's model for mlx-lm

    @property
    def quantized(self) -> bool:
        """``bits = N`` (uniform) or ``recipe = "mixed-L-H"`` (the recipe sets the widths)."""
        from ..quant.plan import is_mixed

        return self.bits is not None or is_mixed(self.recipe)


@dataclass
class ReleasePlan:
    name: str
    path: Path
    source: str
    revision: str | None
    variants: list[Variant]
    verify: dict
    upload: dict


def _fail(path: Path, msg: str) -> UsageError:
    return UsageError(f"{path}: {msg}", "see the release plan schema in the README (section 'release')")


def load_plan(path: Path) -> ReleasePlan:
    """Read and validate a release plan (TOML or YAML) before any work: every key and
    type, widths and modes, repo ids; errors name the table or variant and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the release plan ({exc})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _fail(path, f"not valid TOML ({exc})") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _fail(path, f"not valid YAML ({exc})") from None
    else:
        raise _fail(path, "expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise _fail(path, "the plan must be a table/mapping")
    return _validate(path, data)


SOURCE_KEYS = {"repo_id", "path", "revision"}
UPLOAD_KEYS = {"private", "revision"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _typed(path: Path, where: str, key: str, value, kind, *, positive: bool = False):
    """``value`` checked against ``kind`` (str, int, float, bool or list[str])."""
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        list: isinstance(value, list) and all(isinstance(x, str) for x in value),
    }[kind]
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of strings"}
    if not ok:
        raise _fail(path, f"{where}: {key} must be {names[kind]}, found {value!r}")
    if kind is float and not math.isfinite(value):
        raise _fail(path, f"{where}: {key} must be a finite number, found {value!r}")
    if positive and value <= 0:
        raise _fail(path, f"{where}: {key} must be positive, found {value!r}")
    return value


def _known(path: Path, where: str, table, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise _fail(path, f"{where} must be a table/mapping, found {table!r}")
    bad = sorted(set(table) - allowed)
    if bad:
        import difflib

        near = [difflib.get_close_matches(b, allowed, n=1) for b in bad]
        tips = "; ".join(f"{b!r} (did you mean {m[0]!r}?)" if m else repr(b) for b, m in zip(bad, near))
        raise _fail(path, f"{where}: unknown key(s) {tips}; allowed: {', '.join(sorted(allowed))}")
    return table


def _gates(path: Path, where: str, gates) -> dict:
    _known(path, f"{where} gates", gates, GATE_KEYS)
    for k, v in gates.items():
        _typed(path, f"{where} gates", k, v, float)
        if v < 0:
            raise _fail(path, f"{where} gates: {k} must not be negative, found {v!r}")
    return gates


def _validate(path: Path, data: dict) -> ReleasePlan:
    """The whole plan checked, types included, before any work: every error names
    the table or variant and the key."""
    from ..checkpoint import REPO_ID
    from ..quant.modes import MODES, validate
    from ..quant.plan import is_mixed, parse_bits_for, recipe_widths

    _known(path, "the plan", data, {"name", "source", "variants", "verify", "upload", "mlx_lm_code"})
    if "name" in data:
        _typed(path, "the plan", "name", data["name"], str)
    from ..mlx_lm_code import POLICIES

    def _policy(where: str, value) -> str:
        _typed(path, where, "mlx_lm_code", value, str)
        if value not in POLICIES:
            raise _fail(path, f"{where}: mlx_lm_code {value!r}: expected one of {', '.join(POLICIES)}")
        return value

    default_code = _policy("the plan", data["mlx_lm_code"]) if "mlx_lm_code" in data else "auto"
    src = _known(path, "[source]", data.get("source", None) or {}, SOURCE_KEYS)
    if not (("repo_id" in src) ^ ("path" in src)):
        raise _fail(path, "[source] needs exactly one of repo_id or path")
    for k in src:
        _typed(path, "[source]", k, src[k], str)
    if "repo_id" in src and not REPO_ID.match(src["repo_id"]):
        raise _fail(path, f"[source]: repo_id {src['repo_id']!r} is not a Hub repo id (ORG/NAME)")
    if "path" in src and "revision" in src:
        raise _fail(path, "[source]: revision applies to a Hub repo_id, not to a local path")
    source = src.get("repo_id") or str((path.parent / src["path"]).resolve())

    verify = _known(path, "[verify]", data.get("verify") or {}, VERIFY_KEYS)
    for k, kind, pos in (("random_tokens", int, True), ("num_sequences", int, True), ("seed", int, False),
                         ("decode_steps", int, False), ("ref_dtype", str, False), ("prompts", list, False),
                         ("text_files", list, False)):
        if k in verify:
            _typed(path, "[verify]", k, verify[k], kind, positive=pos)
    if verify.get("decode_steps", 0) < 0:
        raise _fail(path, f"[verify]: decode_steps must not be negative, found {verify['decode_steps']!r}")
    if "ref_dtype" in verify and verify["ref_dtype"] not in FLOAT_DTYPES:
        raise _fail(path, f"[verify]: ref_dtype {verify['ref_dtype']!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    if "gates" in verify:
        _gates(path, "[verify]", verify["gates"])

    upload = _known(path, "[upload]", data.get("upload") or {}, UPLOAD_KEYS)
    if "private" in upload:
        _typed(path, "[upload]", "private", upload["private"], bool)
    if "revision" in upload:
        _typed(path, "[upload]", "revision", upload["revision"], str)

    variants_raw = data.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise _fail(path, "[[variants]] is missing or empty")
    variants, names, repos = [], set(), {}
    for i, v in enumerate(variants_raw):
        if not isinstance(v, dict) or "name" not in v:
            raise _fail(path, f"variant {i + 1} has no name")
        name = v["name"]
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise _fail(path, f"variant {i + 1}: name {name!r} is not a plain name (letters, digits, - and _)")
        if name in names:
            raise _fail(path, f"variant name {name!r} is repeated")
        names.add(name)
        where = f"variant {name!r}"
        _known(path, where, v, VARIANT_KEYS)
        for k, kind in (("dtype", str), ("mode", str), ("recipe", str), ("repo_id", str),
                        ("bits", int), ("group_size", int), ("bits_for", list), ("keep", list),
                        ("require_runtimes", list)):
            if k in v:
                _typed(path, where, k, v[k], kind)
        from ..verify.run import RUNTIMES

        for r in v.get("require_runtimes", []):
            if r not in RUNTIMES:
                raise _fail(path, f"{where}: require_runtimes entry {r!r}: expected one of {', '.join(RUNTIMES)}")
        if "dtype" in v and v["dtype"] not in FLOAT_DTYPES:
            raise _fail(path, f"{where}: dtype {v['dtype']!r}: expected one of {', '.join(FLOAT_DTYPES)}")
        if "mode" in v and v["mode"] not in MODES:
            raise _fail(path, f"{where}: mode {v['mode']!r}: expected one of {', '.join(MODES)}")
        if "repo_id" in v:
            if not REPO_ID.match(v["repo_id"]):
                raise _fail(path, f"{where}: repo_id {v['repo_id']!r} is not a Hub repo id (ORG/NAME)")
            if v["repo_id"] in repos:
                raise _fail(path, f"{where}: repo_id {v['repo_id']!r} is also the repo of variant {repos[v['repo_id']]!r}")
            repos[v["repo_id"]] = name
        quant_keys = sorted({"group_size", "mode", "recipe", "bits_for", "keep"} & set(v))
        mixed = is_mixed(v.get("recipe"))
        if "bits" not in v and not mixed and quant_keys:
            raise _fail(path, f"{where}: {', '.join(quant_keys)} apply to quantized variants; add bits = N "
                        "(or recipe = \"mixed-L-H\")")
        if "bits" in v and mixed:
            # one rule with the CLI (which refuses --bits with --recipe mixed-L-H)
            raise _fail(path, f"{where}: bits = {v['bits']} with recipe = {v['recipe']!r}: a mixed-L-H recipe sets "
                        "the widths itself (L bits, H for the sensitive roles), so bits does not apply; drop bits")
        if "bits" in v or mixed:
            try:
                spec = validate(v.get("bits"), v.get("group_size"), v.get("mode", "affine"))
                recipe_widths(v.get("recipe"), spec)
                parse_bits_for(v.get("bits_for"))
            except UsageError as exc:
                msg = exc.message.replace("--group-size", "group_size").replace("--bits-for", "bits_for")
                msg = msg.replace("--bits", "bits").replace("--mode", "mode").replace("--recipe", "recipe")
                raise _fail(path, f"{where}: {msg}") from None
        if "gates" in v:
            _gates(path, where, v["gates"])
        code = _policy(where, v["mlx_lm_code"]) if "mlx_lm_code" in v else default_code
        variants.append(Variant(**{**{k: v[k] for k in v}, "mlx_lm_code": code}))
    return ReleasePlan(
        name=str(data.get("name") or path.stem),
        path=path,
        source=source,
        revision=src.get("revision"),
        variants=variants,
        verify=verify,
        upload=upload,
    )


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _State:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.data = {}

    def get(self, *keys):
        node = self.data
        for k in keys:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return node or None

    def set(self, value, *keys):
        node = self.data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        tmp = self.path.with_name(self.path.name + ".partial")
        with interrupt.critical():  # the state file is never half-written
            tmp.write_text(json.dumps(self.data, indent=2))
            tmp.replace(self.path)


def run_release(
    plan: ReleasePlan,
    workdir: Path | None = None,
    dry_run: bool = False,
    upload: bool = True,
    log: Callable[[str], None] = print,
    stream: bool | None = None,
) -> dict:
    """`hybridconv release`: per variant convert or quantize, verify against one shared
    reference run, upload; resumable from ``WORKDIR/release-state.json``. Returns the
    summary dict (``ok`` is false when any variant failed). ``stream``: the reference
    and each variant's verification run one block at a time (True), whole (False), or
    as memory allows (None; see ``verify_folder``)."""
    from ..checkpoint import resolve
    from ..convert import plan as plan_conversion
    from ..quant.modes import validate
    from ..quant.plan import build_plan

    workdir = Path(workdir) if workdir else plan.path.parent / f"release-{plan.name}"
    src = resolve(plan.source, plan.revision)
    summary: dict = {"plan": plan.name, "source": plan.source, "source_revision": src.revision,
                     "workdir": str(workdir), "dry_run": dry_run, "variants": [], "reference_runs": 0}
    if dry_run:
        for v in plan.variants:
            p = plan_conversion(src, v.dtype)
            if v.quantized:
                qp = build_plan(p, validate(v.bits, v.group_size, v.mode), v.recipe, v.bits_for, v.keep)
                size, bpw = qp.total_bits // 8, qp.bits_per_weight
                what = f"quantize {qp.label()}, {bpw:.2f} bits/weight"
            else:
                size, bpw = p.output_bytes(), None
                what = "convert " + (v.dtype or "as stored")
            target = v.repo_id if (upload and v.repo_id) else None
            from ..mlx_lm_code import decide

            carries, why = decide(v.mlx_lm_code, p.arch.mlx_lm_support(p.config))
            summary["variants"].append({
                "name": v.name, "build": what, "bytes": size,
                "bits_per_weight": bpw, "verify": "would verify", "kl_mean": None,
                "upload": f"would upload to {target}" if target else "no upload", "repo_id": v.repo_id,
                "mlx_lm_code": {"policy": v.mlx_lm_code, "carries": carries, "reason": why},
            })
            log(f"{v.name}: {what} ({size / 1e6:.2f} MB) -> verify -> "
                f"{('would upload to ' + target) if target else 'no upload'}")
        summary["reference"] = "would run once and be reused by every variant"
        summary["ok"] = True
        summary["exit_code"] = 0
        return summary

    if upload and any(v.repo_id for v in plan.variants):
        from .upload import token

        if not token():
            from ..errors import HubError

            raise HubError(
                "no Hugging Face token: the plan uploads variants, and nothing was built",
                "set HF_TOKEN or run `hf auth login` (or pass --no-upload to build and verify only)",
            )
    workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir):
        return _run(plan, workdir, src, summary, upload, log, stream)


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """One release run per WORKDIR at a time: a second one (same plan or not) would
    build into, verify and replace the same variant folders while the first uses
    them. The lock is ``flock`` on ``WORKDIR/.release.lock``, released by the kernel
    when the process ends however it ends (no stale lock after a crash); the file
    is removed when the run ends (while still locked, and a run that locked a file
    since removed tries again, so two runs never hold two different files)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    path = workdir / ".release.lock"
    for _ in range(5):
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UsageError(
                f"{workdir}: another release run is using this work folder ({holder}); nothing was done",
                "wait for it to finish, or pass another --workdir",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # removed by the run that just ended: lock the new file instead
    else:  # pragma: no cover - only if other runs keep starting and ending in between
        raise UsageError(f"{workdir}: other release runs keep using this work folder", "try again")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        f.close()


def _run(plan: ReleasePlan, workdir: Path, src, summary: dict, upload: bool, log, stream: bool | None = None) -> dict:
    from ..convert import convert
    from ..hashing import weights_hash
    from ..quant.run import quantize

    state = _State(workdir / "release-state.json")

    # The PyTorch reference, once for all variants.
    vcfg = plan.verify
    ref_file = workdir / "reference.safetensors"
    ref_key = _key(__version__, plan.source, src.revision, {k: vcfg.get(k) for k in sorted(VERIFY_KEYS - {"gates", "decode_steps"})})
    if state.get("reference") == ref_key and ref_file.is_file():
        summary["reference"] = f"reused {ref_file}"
        log(f"reference: reusing {ref_file}")
    else:
        from ..verify.inputs import inputs_for
        from ..verify.reference import compute_reference, write_reference_file

        inputs = inputs_for(src.path, prompts=vcfg.get("prompts"),
                            text_files=[Path(plan.path.parent, f) for f in vcfg.get("text_files") or []],
                            random_tokens=vcfg.get("random_tokens"), num_sequences=vcfg.get("num_sequences"),
                            seed=vcfg.get("seed", 0))
        log(f"reference: running the PyTorch reference on {inputs.description}")
        ref = compute_reference(src, inputs, vcfg.get("ref_dtype", "float32"), stream=stream)
        write_reference_file(ref, ref_file, with_hidden=True)
        state.set(ref_key, "reference")
        summary["reference_runs"] = 1
        summary["reference"] = f"computed once: {ref_file}"
    from ..verify.reference import read_reference_file
    from ..verify.run import REPORT_NAME, available_runtimes, verify_folder, write_report

    reference = read_reference_file(ref_file)
    for v in plan.variants:
        interrupt.check()  # a safe point: between variants
        row = {"name": v.name, "repo_id": v.repo_id, "build": "", "verify": "", "upload": "", "kl_mean": None,
               "bytes": None, "reasons": []}
        summary["variants"].append(row)
        out = workdir / "variants" / v.name
        try:
            # 1. build
            recipe = {k: x for k, x in asdict(v).items() if k != "require_runtimes"}  # verify's business
            build_key = _key(__version__, plan.source, src.revision, recipe | {"gates": None, "repo_id": None})
            if state.get("variants", v.name, "build") == build_key and (out / "config.json").is_file():
                row["build"] = "skipped (unchanged)"
            else:
                if v.quantized:
                    quantize(plan.source, out, v.bits, v.group_size, v.mode, v.recipe, v.bits_for, v.keep,
                             v.dtype, plan.revision, force=True, mlx_lm_code=v.mlx_lm_code)
                else:
                    convert(plan.source, out, v.dtype, plan.revision, force=True, mlx_lm_code=v.mlx_lm_code)
                state.set(build_key, "variants", v.name, "build")
                row["build"] = "built"
            row["bytes"] = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
            log(f"{v.name}: {row['build']}")
            interrupt.check()
            # 2. verify, against the stored reference
            gates = {**(vcfg.get("gates") or {}), **v.gates}
            whash = weights_hash(out)
            runtimes = available_runtimes()
            verify_key = _key(whash, ref_key, gates, vcfg.get("decode_steps", 8))
            if runtimes != ("hybridconv",) or v.require_runtimes:  # keys of plans without them unchanged
                verify_key = _key(verify_key, runtimes, v.require_runtimes)
            report_path = out / REPORT_NAME
            if state.get("variants", v.name, "verify") == verify_key and report_path.is_file():
                report = json.loads(report_path.read_text())
                row["verify"] = f"{report['verdict']} (skipped, unchanged)"
            else:
                report = verify_folder(out, reference, gate_overrides=gates,
                                       decode_steps=vcfg.get("decode_steps", 8),
                                       runtimes=runtimes, require=v.require_runtimes, stream=stream).report
                write_report(report, report_path)
                state.set(verify_key, "variants", v.name, "verify")
                row["verify"] = report["verdict"]
            row["kl_mean"] = ((report.get("metrics") or {}).get("overall") or {}).get("kl_mean")
            row["reasons"] = report.get("failure_reasons", [])
            row["runtimes"] = {n: r.get("verdict") for n, r in (report.get("runtimes") or {}).items()}
            log(f"{v.name}: verify {row['verify']}")
            interrupt.check()
            if report["verdict"] != "pass":
                row["upload"] = "refused (verification failed)"
                row["failed"] = True
                continue
            # 3. upload
            if not (upload and v.repo_id):
                row["upload"] = "not requested"
                continue
            up = plan.upload
            upload_key = _key(whash, v.repo_id, up.get("revision"))
            if state.get("variants", v.name, "upload") == upload_key:
                row["upload"] = "skipped (already uploaded)"
            else:
                from .upload import upload as do_upload

                do_upload(out, v.repo_id, bool(up.get("private", False)), up.get("revision"))
                state.set(upload_key, "variants", v.name, "upload")
                row["upload"] = "uploaded"
            log(f"{v.name}: {row['upload']}")
        except HybridconvError as exc:
            row["failed"] = True
            row["reasons"].append(exc.message)
            if exc.exit_code == EXIT_HUB:  # the Hub refused or could not be reached: say so, go on
                row["hub_error"] = True
                row["upload"] = "failed (Hub)"
            row["upload"] = row["upload"] or "not attempted"
            log(f"{v.name}: FAILED: {exc.message}")
    rows = summary["variants"]
    summary["ok"] = not any(r.get("failed") for r in rows)
    # 5 when an upload failed at the Hub (the network or the Hub itself), else 1 when a
    # variant failed; 0 when every variant was built, verified and (if asked) uploaded
    summary["exit_code"] = EXIT_HUB if any(r.get("hub_error") for r in rows) else (0 if summary["ok"] else 1)
    summary["done"] = [r["name"] for r in rows if not r.get("failed")]
    summary["not_done"] = [r["name"] for r in rows if r.get("failed")]
    return summary
