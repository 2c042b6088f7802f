"""Imports point down: cli -> publish -> quant / verify / inspect -> convert / loading
-> checkpoint / converters -> config / safetensors_io / errors / ... -> models.

Every ``import`` of a hybridconv module anywhere in the package, lazy ones inside
functions included, is parsed; an import of a higher layer fails the test,
naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridconv"

# Higher number = higher layer. A module may import its own layer or lower ones.
LAYERS = {
    "models": 0,
    "errors": 1, "safetensors_io": 1, "config": 1, "interrupt": 1, "resources": 1, "blas": 1, "float32_compute": 1,
    "checkpoint": 2, "converters": 2, "hashing": 2, "mlx_lm_code": 2,
    "convert": 3, "loading": 3,
    "quant": 4, "verify": 4, "inspect": 4,
    "publish": 5,
    "cli": 6, "__main__": 6,
}


def _layer_of(module: str) -> int | None:
    """``hybridconv.verify.run`` -> the layer of ``verify``; the package root
    (``__init__``: version string, public re-exports) has none."""
    parts = module.split(".")
    if parts[0] != "hybridconv" or len(parts) == 1:
        return None
    return LAYERS[parts[1]]


def _module_name(path: Path) -> tuple[str, list[str]]:
    """(dotted name, its package as a list) of a file in the package."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    pkg = parts if rel.name == "__init__" else parts[:-1]
    return ".".join(parts), pkg


def _imports(text: str, pkg: list[str]):
    """(line, imported hybridconv module) for every import in ``text``, a file of
    package ``pkg`` (relative imports resolved)."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hybridconv":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "hybridconv":
                continue
            if mod == "hybridconv":  # `from .. import x`: x may be a subpackage
                for alias in node.names:
                    yield node.lineno, f"hybridconv.{alias.name}" if alias.name in LAYERS else mod + ".__init__"
            else:
                yield node.lineno, mod


def test_every_module_has_a_layer():
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.name != "__init__.py"}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer, pkg = _module_name(path)
        own = _layer_of(importer)
        if own is None:
            continue  # the package root re-exports the public API
        for line, mod in _imports(path.read_text(), pkg):
            if mod == "hybridconv":
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the package root (import the module itself)")
            elif mod != "hybridconv.__init__" and _layer_of(mod) > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({importer}) imports {mod}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import():
    """The test above can fail: a lazy import of quant inside convert is found."""
    found = list(_imports("def f():\n    from .quant.writer import write_quantized\n", ["hybridconv"]))
    assert found == [(2, "hybridconv.quant.writer")]
    assert _layer_of(found[0][1]) > LAYERS["convert"]
    found = list(_imports("import hybridconv\n", ["hybridconv", "verify"]))
    assert found == [(1, "hybridconv")]
