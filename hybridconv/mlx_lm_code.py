"""The model file an output carries for mlx-lm: hybridconv's own model code,
made into one self-contained Python file.

mlx-lm runs code a checkpoint carries: ``config.json``'s ``model_file`` names a
Python file in the folder that provides ``Model`` and ``ModelArgs``, used only
with ``trust_remote_code`` (``--trust-remote-code`` in ``mlx_lm.generate``,
``mlx_lm.server``, ``mlx_lm.chat``). Where mlx-lm's built-in model cannot open an
output, computes another function, or may differ for its config
(``converters/_mlx_lm.py``), the output carries :data:`CARRIED_FILE`, generated
here mechanically from the architecture's module in ``hybridconv.models`` and
the modules it imports (transitively, inside ``hybridconv.models``): the same
functions ``hybridconv.load`` and ``verify`` run, never a hand-kept copy.

How the file is made (:func:`generate`), so that it stays readable and computes
exactly what the modules compute:

* each module's source, in dependency order, becomes the body of a function
  ``_module_<name>()`` that ends ``return _namespace(locals())``; the file binds
  the result to ``hybridconv_models.<name>``. Every module thus keeps its own
  globals (every model module defines ``ModelArgs``, ``Model``,
  ``layer_schedule``, ...: Qwen3.5 builds on Qwen3-Next, Granite-4.0-H on Bamba,
  LFM2-MoE on LFM2), and its code is unchanged but for indentation;
* ``from .common import MLP, Attention`` becomes ``MLP =
  hybridconv_models.common.MLP`` (one line per name), ``from . import mamba``
  becomes ``mamba = hybridconv_models.mamba``;
* ``from __future__ import annotations`` is removed and function annotations are
  written as the strings that import made them (mlx-lm executes the file
  without registering it in ``sys.modules``, where ``dataclasses`` would look
  string field annotations up); dataclass field annotations stay expressions;
* the file ends ``Model = hybridconv_models.<arch>.Model`` and ``ModelArgs = ...``.

Running a module's top level inside a function is the same computation except
in cases the generator refuses, naming the module and line: ``global`` /
``nonlocal``; ``globals()``, ``locals()``, ``vars()``, ``exec``, ``eval``,
``compile``, ``__import__``, ``open``, ``__file__``, ``__name__``; a top-level
name that is also a builtin (a function local shadows the builtin before its
assignment, a module global does not); a class body that reads a name it also
assigns and the module defines (class bodies skip the enclosing function's
names); the generator's own names. Imports outside the standard library, mlx,
mlx_lm and ``hybridconv.models``, and standard modules that reach the network,
other processes or load code (socket, urllib, subprocess, importlib, pickle,
...) are refused too: the file imports only mlx, mlx_lm and the standard
library, and does no network or file access. ``tests/test_mlx_lm_code.py``
checks, for every registered architecture, that each generated function body
is the module's syntax tree statement for statement (imports and annotations
aside) and that the generated model's logits and caches equal hybridconv's
bit for bit.

The output is deterministic (no dates): the same hybridconv writes the same
bytes, whose sha256 ``conversion.json`` records and the weights hash that gates
``upload`` covers (:mod:`hybridconv.hashing`).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import HybridconvError

CARRIED_FILE = "hybridconv_model.py"
POLICIES = ("auto", "always", "never")
PACKAGE = "hybridconv.models"
MODELS_DIR = Path(__file__).resolve().parent / "models"

# Names the generated file defines at its top level: no module may bind them.
RESERVED = {"hybridconv_models", "_namespace"}
# Standard-library modules no model code needs: network, processes, code loading.
DENIED_STDLIB = {
    "socket", "ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
    "xmlrpc", "socketserver", "asyncio", "selectors", "subprocess", "multiprocessing", "concurrent", "ctypes",
    "importlib", "pickle", "marshal", "shelve", "runpy", "code", "codeop", "pty", "webbrowser", "pkgutil",
    "zipimport",
}
# Names whose meaning changes inside a function, or that run or load code.
DENIED_NAMES = {"globals", "locals", "vars", "exec", "eval", "compile", "__import__", "open", "input",
                "breakpoint", "__file__", "__name__", "__spec__", "__loader__", "__builtins__"}


class CarriedCodeError(HybridconvError):
    """A model module cannot be made into a carried file (or a carried file is wrong)."""

    exit_code = 70

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint or "this is a bug in hybridconv's model code: report it (--debug shows where)")


@dataclass(frozen=True)
class Module:
    name: str  # the module's name inside hybridconv.models
    path: Path
    source: str
    tree: ast.Module

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()


def _read(name: str) -> Module:
    path = MODELS_DIR / f"{name}.py"
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CarriedCodeError(f"{path}: cannot read hybridconv's model module ({exc.strerror or exc})") from None
    return Module(name, path, source, ast.parse(source, str(path)))


def _model_import(node: ast.ImportFrom) -> list[tuple[str, str | None, str]] | None:
    """For an import from inside hybridconv.models: ``[(module, attribute or None,
    bound name)]``; None for any other ``from`` import."""
    if node.level == 1:
        base = node.module
    elif node.level == 0 and node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        base = node.module[len(PACKAGE) + 1:] or None
    else:
        return None
    if base is None:  # from . import mamba
        return [(alias.name, None, alias.asname or alias.name) for alias in node.names]
    if "." in base:
        raise ValueError(f"from {base} import: only modules directly in {PACKAGE} can be carried")
    return [(base, alias.name, alias.asname or alias.name) for alias in node.names]


def _stdlib(root: str) -> bool:
    return root in sys.stdlib_module_names


def _check_import_root(mod: Module, node: ast.AST, root: str) -> None:
    where = f"{mod.path.name}:{node.lineno}"
    if root in ("mlx", "mlx_lm"):
        return
    if root == "hybridconv":
        raise CarriedCodeError(f"{where}: imports hybridconv outside {PACKAGE}; a carried model may import only "
                               f"{PACKAGE} modules, mlx, mlx_lm and the standard library")
    if not _stdlib(root):
        raise CarriedCodeError(f"{where}: imports {root!r}, which is not mlx, mlx_lm or the standard library: "
                               "the carried file could not run where only mlx-lm is installed")
    if root in DENIED_STDLIB:
        raise CarriedCodeError(f"{where}: imports {root!r} (network, processes or code loading): refused in model "
                               "code that outputs carry")


def _dependencies(mod: Module) -> list[str]:
    """The hybridconv.models modules ``mod`` imports, in first-import order; every
    other import checked against what a carried file may import."""
    deps: list[str] = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            try:
                found = _model_import(node)
            except ValueError as exc:
                raise CarriedCodeError(f"{mod.path.name}:{node.lineno}: {exc}") from None
            if found is None:
                if node.level:
                    raise CarriedCodeError(f"{mod.path.name}:{node.lineno}: a relative import outside {PACKAGE}")
                _check_import_root(mod, node, node.module.split(".")[0])
                continue
            for dep, _, _ in found:
                if not (MODELS_DIR / f"{dep}.py").is_file():
                    raise CarriedCodeError(f"{mod.path.name}:{node.lineno}: {PACKAGE}.{dep} is not a module file")
                if dep not in deps:
                    deps.append(dep)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                _check_import_root(mod, node, alias.name.split(".")[0])
    return deps


def closure(name: str) -> list[Module]:
    """``name`` and every hybridconv.models module it imports, transitively,
    dependencies first (each once)."""
    order: list[Module] = []
    seen: set[str] = set()
    active: list[str] = []

    def visit(n: str) -> None:
        if n in seen:
            return
        if n in active:
            raise CarriedCodeError(f"{PACKAGE}: circular import {' -> '.join(active + [n])}")
        active.append(n)
        mod = _read(n)
        for dep in _dependencies(mod):
            visit(dep)
        active.pop()
        seen.add(n)
        order.append(mod)

    visit(name)
    return order


# --- checks: what running a module's top level inside a function would change -------------------


def _bound_at_top(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (including inside if/try/with/for blocks)."""
    names: set[str] = set()

    def targets(node):
        for t in ast.walk(node):
            if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store):
                names.add(t.id)

    def walk(body):
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(st.name)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                for a in st.names:
                    names.add(a.asname or a.name.split(".")[0])
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in (st.targets if isinstance(st, ast.Assign) else [st.target]):
                    targets(t)
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                targets(st.target)
                walk(st.body)
                walk(st.orelse)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
                walk(st.body)
            elif isinstance(st, ast.If) or isinstance(st, ast.While):
                walk(st.body)
                walk(st.orelse)
            elif isinstance(st, ast.Try):
                walk(st.body)
                for h in st.handlers:
                    if h.name:
                        names.add(h.name)
                    walk(h.body)
                walk(st.orelse)
                walk(st.finalbody)
            else:
                for t in ast.walk(st):  # walrus at top level
                    if isinstance(t, ast.NamedExpr):
                        targets(t.target)
    walk(tree.body)
    return names


def _class_body_names(cls: ast.ClassDef) -> tuple[set[str], set[str]]:
    """(names stored, names loaded) by a class body itself (not its methods,
    nested classes, lambdas or comprehensions: those have their own scopes)."""
    stores: set[str] = set()
    loads: set[str] = set()
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp, ast.SetComp,
              ast.DictComp, ast.GeneratorExp)

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, scopes):
                # decorators, bases and defaults are evaluated in the class body
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    stores.add(child.name)
                    for d in child.decorator_list:
                        visit_expr(d)
                    if isinstance(child, ast.ClassDef):
                        for b in child.bases + [k.value for k in child.keywords]:
                            visit_expr(b)
                    else:
                        for d in child.args.defaults + [d for d in child.args.kw_defaults if d is not None]:
                            visit_expr(d)
                continue
            if isinstance(child, ast.Name):
                (stores if isinstance(child.ctx, ast.Store) else loads).add(child.id)
            visit(child)

    def visit_expr(e):
        if isinstance(e, ast.Name):
            loads.add(e.id)
        visit(e)

    for st in cls.body:
        visit_expr(st) if isinstance(st, ast.expr) else visit(ast.Module(body=[st], type_ignores=[]))
    return stores, loads


def check_module(mod: Module) -> None:
    """Refuse a module whose top level would compute differently inside a
    function (module docstring), or that names what a carried file may not use."""
    top = _bound_at_top(mod.tree)
    shadow = sorted(top & set(dir(builtins)) - {"__doc__"})
    if shadow:
        raise CarriedCodeError(f"{mod.path.name}: binds the builtin name(s) {', '.join(shadow)} at its top level")
    clash = sorted(top & RESERVED)
    if clash:
        raise CarriedCodeError(f"{mod.path.name}: binds {', '.join(clash)}, a name the carried file reserves")
    for node in ast.walk(mod.tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            raise CarriedCodeError(f"{mod.path.name}:{line}: a {type(node).__name__.lower()} statement "
                                   "(its meaning changes when the module becomes a function)")
        if isinstance(node, ast.Name) and node.id in DENIED_NAMES | RESERVED:
            raise CarriedCodeError(f"{mod.path.name}:{line}: uses {node.id!r}, refused in carried model code")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in RESERVED:
            raise CarriedCodeError(f"{mod.path.name}:{line}: defines {node.name!r}, a name the carried file reserves")
        if isinstance(node, ast.arg) and node.arg in RESERVED:
            raise CarriedCodeError(f"{mod.path.name}:{line}: an argument named {node.arg!r}, reserved")
        if isinstance(node, ast.ClassDef):
            stores, loads = _class_body_names(node)
            both = sorted(stores & loads & top)
            if both:
                raise CarriedCodeError(
                    f"{mod.path.name}:{line}: class {node.name} reads and assigns {', '.join(both)}, also a "
                    "module-level name (inside a function, a class body does not see the function's names)")


# --- the text transformation --------------------------------------------------------------------


class _Edits:
    """Replacements of source spans given as (line, byte column) pairs, as ``ast`` reports them."""

    def __init__(self, source: str):
        self.lines = source.splitlines(keepends=True)
        self.edits: list[tuple[int, int, int, int, str]] = []

    def replace(self, node: ast.AST, text: str) -> None:
        self.edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, text))

    def segment(self, node: ast.AST) -> str:
        """The source text of ``node`` (``ast.get_source_segment`` without splitting
        the whole source again for every node)."""
        first = self.lines[node.lineno - 1].encode("utf-8")
        if node.lineno == node.end_lineno:
            return first[node.col_offset: node.end_col_offset].decode("utf-8")
        middle = [line.encode("utf-8") for line in self.lines[node.lineno: node.end_lineno - 1]]
        last = self.lines[node.end_lineno - 1].encode("utf-8")[: node.end_col_offset]
        return b"".join([first[node.col_offset:], *middle, last]).decode("utf-8")

    def replace_lines(self, first: int, last: int, text: str) -> None:
        """Lines ``first..last`` (1-based, whole lines) by ``text`` (its own lines)."""
        self.edits.append((first, 0, last, len(self.lines[last - 1].encode("utf-8")), text))

    def apply(self) -> str:
        starts = [0]
        data = "".join(self.lines).encode("utf-8")
        for line in self.lines:
            starts.append(starts[-1] + len(line.encode("utf-8")))
        for l0, c0, l1, c1, text in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            a, b = starts[l0 - 1] + c0, starts[l1 - 1] + c1
            data = data[:a] + text.encode("utf-8") + data[b:]
        return data.decode("utf-8")


def _line_of_own(node: ast.stmt, lines: list[str]) -> bool:
    """Whether a statement occupies its lines alone (nothing before it on its
    first line, nothing but a comment after it on its last)."""
    first = lines[node.lineno - 1].encode("utf-8")
    last = lines[node.end_lineno - 1].encode("utf-8")
    before = first[: node.col_offset].strip()
    after = last[node.end_col_offset:].strip()
    return not before and (not after or after.startswith(b"#"))


def _annotations(tree: ast.AST):
    """Every function argument and return annotation (at any depth)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                if arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns


def _transform(mod: Module) -> str:
    """The module's source with its imports from hybridconv.models rewritten, the
    ``__future__`` import removed and function annotations as strings."""
    edits = _Edits(mod.source)
    for node in ast.walk(mod.tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.module == "__future__":
            if [a.name for a in node.names] != ["annotations"] or not _line_of_own(node, edits.lines):
                raise CarriedCodeError(f"{mod.path.name}:{node.lineno}: only `from __future__ import annotations` "
                                       "on its own line can be carried")
            edits.replace_lines(node.lineno, node.end_lineno, "")
            continue
        found = _model_import(node)
        if found is None:
            continue
        if not _line_of_own(node, edits.lines):
            raise CarriedCodeError(f"{mod.path.name}:{node.lineno}: an import that shares its line with other code")
        indent = edits.lines[node.lineno - 1][: node.col_offset]
        new = []
        for dep, attr, bound in found:
            value = f"hybridconv_models.{dep}" + (f".{attr}" if attr else "")
            new.append(f"{indent}{bound} = {value}\n")
        edits.replace_lines(node.lineno, node.end_lineno, "".join(new))
    for ann in _annotations(mod.tree):
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            continue  # already a string
        edits.replace(ann, repr(" ".join(edits.segment(ann).split())))
    return edits.apply()


def _docstring_lines(tree: ast.AST) -> set[int]:
    """Lines of docstrings (module, classes, functions): indented with the code."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def _string_continuations(source: str) -> set[int]:
    """Lines (1-based) that begin inside a multi-line string literal: indenting
    them would change the string."""
    inside: set[int] = set()
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    open_f: list[int] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
        elif fstring_start is not None and tok.type == fstring_start:
            open_f.append(tok.start[0])
        elif fstring_end is not None and tok.type == fstring_end and open_f:
            start = open_f.pop()
            inside.update(range(start + 1, tok.end[0] + 1))
    return inside


def _indent(source: str) -> str:
    keep = _string_continuations(source) - _docstring_lines(ast.parse(source))
    out = []
    for i, line in enumerate(source.splitlines(keepends=True), start=1):
        out.append(line if i in keep or not line.strip() else "    " + line)
    return "".join(out)


def _wrapped(mod: Module) -> str:
    body = _indent(_transform(mod)).rstrip("\n")
    rule = "# " + "=" * 94
    return (f"{rule}\n# hybridconv.models.{mod.name}  (hybridconv/models/{mod.name}.py, sha256 {mod.sha256})\n{rule}\n\n\n"
            f"def _module_{mod.name}():\n{body}\n\n    return _namespace(locals())\n\n\n"
            f"hybridconv_models.{mod.name} = _module_{mod.name}()\n")


def generate(arch) -> str:
    """The carried file's text for an :class:`~hybridconv.converters.Architecture`."""
    name = arch.model_module.__name__
    if not name.startswith(PACKAGE + ".") or "." in name[len(PACKAGE) + 1:]:
        raise CarriedCodeError(f"{name}: only model modules directly in {PACKAGE} can be carried")
    modules = closure(name[len(PACKAGE) + 1:])
    for mod in modules:
        check_module(mod)
    listing = "\n".join(f"    hybridconv/models/{m.name}.py  sha256 {m.sha256}" for m in modules)
    top = modules[-1].name
    header = f'''"""hybridconv's {arch.title} model (model_type {arch.model_type!r}) for mlx-lm.

Generated by hybridconv {__version__} from its model modules, dependencies first:
{listing}

This is the implementation `hybridconv verify` runs and proves on these weights;
mlx-lm runs it when the checkpoint's config.json names this file (``model_file``)
and the user trusts it: ``mlx_lm.load(path, trust_remote_code=True)``,
``mlx_lm.generate --trust-remote-code`` (also ``mlx_lm.server``, ``mlx_lm.chat``).

Each module's source is unchanged but for what one file needs: its code is the
body of a function ``_module_<name>()`` that returns its names (so every module
keeps its own ``ModelArgs``, ``Model``, ...), found as ``hybridconv_models.<name>``;
``from .common import X`` reads ``X = hybridconv_models.common.X``; function
annotations are the strings ``from __future__ import annotations`` made them.
It imports only mlx, mlx_lm and the Python standard library: no network, no file
access, no exec or eval. Its sha256 is in the folder's conversion.json and in the
weights hash that gates `hybridconv upload`.
"""

import types


def _namespace(names: dict) -> types.SimpleNamespace:
    """A module's names, as the module object it would have been."""
    return types.SimpleNamespace(**names)


hybridconv_models = types.SimpleNamespace()


'''
    body = "\n\n".join(_wrapped(m) for m in modules)
    tail = (f"\n\n# What mlx-lm's loader reads (mlx_lm.utils.load_model: model_file).\n"
            f"Model = hybridconv_models.{top}.Model\nModelArgs = hybridconv_models.{top}.ModelArgs\n")
    return header + body + tail


def sha256_of(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the policy: which outputs carry the file -----------------------------------------------------


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        from .errors import UsageError

        raise UsageError(f"--mlx-lm-code {policy!r}: expected one of {', '.join(POLICIES)}",
                         "auto: carry hybridconv's model where mlx-lm's own cannot run the output right; "
                         "always; never")
    return policy


def decide(policy: str, support) -> tuple[bool, str]:
    """(carry the file?, why) for ``--mlx-lm-code POLICY`` and mlx-lm's statement on
    the output (:class:`~hybridconv.converters.registry.MlxLm`). ``auto`` carries it
    exactly where mlx-lm's own model cannot open the output, computes another
    function, or may differ for this config (or nothing was measured)."""
    check_policy(policy)
    if policy == "always":
        return True, "--mlx-lm-code always"
    if policy == "never":
        return False, "--mlx-lm-code never" + (f" (mlx-lm {support.line()})" if support.status != "computes" else "")
    if support.status == "computes":
        return False, "mlx-lm's own model computes it"
    return True, f"mlx-lm's own model {support.line()}"


def carried_code(out: Path) -> dict | None:
    """The model file a folder carries for mlx-lm (``config.json``'s ``model_file``),
    if any: ``{file, sha256, recorded, matches, reason}`` (``recorded``:
    conversion.json's sha256; ``matches``: the file is what hybridconv wrote;
    ``reason``: why it was carried)."""
    out = Path(out)
    try:
        name = json.loads((out / "config.json").read_text()).get("model_file")
    except (OSError, ValueError, AttributeError):
        return None
    if not name:
        return None
    if not isinstance(name, str) or Path(name).name != name:  # not a file of this folder: never run
        return {"file": str(name), "sha256": None, "recorded": None, "matches": False, "reason": None}
    path = out / name
    try:
        record = json.loads((out / "conversion.json").read_text()).get("mlx_lm_code") or {}
    except (OSError, ValueError, AttributeError):
        record = {}
    try:
        sha = sha256_of(path.read_bytes())
    except OSError:
        sha = None
    recorded = record.get("sha256") if record.get("file") == name else None
    return {"file": name, "sha256": sha, "recorded": recorded, "matches": sha is not None and sha == recorded,
            "reason": record.get("reason")}
