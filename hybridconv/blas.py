"""An optimised BLAS for MLX's CPU backend on Linux, loaded before MLX.

The ``mlx[cpu]`` wheel for Linux bundles the *reference* (netlib) BLAS in
``site-packages/mlx_cpu.libs/libblas-*.so``: MLX's float32 matmul runs there at
1-2 GFLOP/s, where numpy or torch run the same product at tens of GFLOP/s. MLX
calls the standard ``cblas_*`` names through the dynamic linker, and the linker
looks in the process's global scope before a library's own dependencies; so a
BLAS with the standard names loaded with ``RTLD_GLOBAL`` *before* ``libmlx.so``
is loaded (before the first ``import mlx.core``) is the one MLX calls.

Source: the system OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread`` or
``libopenblas0``, ``libopenblas.so.0``; Fedora ``openblas``), found at run time.
It has the standard names, picks its kernels for the processor at run time and
needs no compiler; the Makefile installs it where apt is available as root.
numpy's and scipy's bundled OpenBLAS cannot serve: their symbols are prefixed.
Nothing depends on it for correctness: without it MLX runs its bundled BLAS,
computing the same products (in another summation order) more slowly, and
``hybridconv doctor`` says what to install.

``HYBRIDCONV_BLAS`` chooses: unset or ``auto`` (load the system OpenBLAS when
MLX's bundled BLAS is the reference one), ``off`` (never load anything), or the
path of a BLAS library with the standard CBLAS names. OpenBLAS's own variables
(``OPENBLAS_NUM_THREADS``, ``OPENBLAS_CORETYPE``, ...) are left as they are.

:func:`preload` runs when the package is imported (``hybridconv/__init__``), so
the CLI, ``import hybridconv`` and the tests (their conftest imports hybridconv
first) all get it; :func:`status` says what happened and what MLX calls.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = "HYBRIDCONV_BLAS"
# sonames tried in order by dlopen's usual search (ld.so.cache, LD_LIBRARY_PATH)
CANDIDATES = ("libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so")
INSTALL_HINT = (
    "install the system OpenBLAS before the first `import mlx` of the process: "
    "`apt-get install libopenblas0-pthread` (Debian/Ubuntu; `dnf install openblas` on Fedora), "
    "or set HYBRIDCONV_BLAS=/path/to/libopenblas.so"
)

_state: dict = {"attempted": False, "warned": False}


class SlowBlasWarning(RuntimeWarning):
    """MLX computes on its bundled reference BLAS (float32 products 10-50x slower)."""


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def bundled_blas() -> Path | None:
    """The reference BLAS that the mlx[cpu] wheel bundles, found without importing mlx."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        libs = Path(loc).parent / "mlx_cpu.libs"
        found = sorted(libs.glob("libblas-*.so*")) if libs.is_dir() else []
        if found:
            return found[0]
    return None


def _mlx_loaded() -> bool:
    return "mlx.core" in sys.modules


def _global_cblas_sgemm() -> str | None:
    """The file that defines ``cblas_sgemm`` in the process's global scope (what a
    library loaded now, or loaded earlier with no global definition bound at its
    own load, resolves to), or None when the global scope has none."""
    try:
        libc = ctypes.CDLL(None)
        addr = ctypes.cast(libc.cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    try:
        if libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    return "(unknown file)"


def _describe(lib: ctypes.CDLL) -> dict:
    out: dict = {}
    for name, key in (("openblas_get_config", "config"), ("openblas_get_corename", "core")):
        try:
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out[key] = fn().decode()
        except (AttributeError, OSError):
            pass
    try:
        out["threads"] = int(lib.openblas_get_num_threads())
    except (AttributeError, OSError):
        pass
    return out


def _system_openblas() -> str | None:
    """The path of the system OpenBLAS the automatic setting would load, if any
    (asked of the dynamic linker without loading it)."""
    import ctypes.util

    for name in ("openblas", "openblasp"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload() -> dict:
    """Load an optimised BLAS into the global scope if it can still reach MLX.
    Never raises; idempotent. Returns :func:`status`."""
    if _state["attempted"]:
        return status()
    _state["attempted"] = True
    setting = os.environ.get(ENV, "auto").strip() or "auto"
    _state["setting"] = setting
    if setting.lower() == "off":
        _state["action"] = f"not loaded: {ENV}=off"
        return status()
    if not sys.platform.startswith("linux"):
        _state["action"] = "not needed: MLX uses the platform's BLAS here"
        return status()
    if _mlx_loaded():
        _state["action"] = "too late: mlx was imported before hybridconv"
        return status()
    if setting.lower() == "auto":
        if bundled_blas() is None:
            _state["action"] = "not needed: MLX does not bundle the reference BLAS here"
            return status()
        names = CANDIDATES
    else:
        names = (setting,)
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(str(exc))
            continue
        if not hasattr(lib, "cblas_sgemm"):
            errors.append(f"{name}: no cblas_sgemm (prefixed or not a CBLAS)")
            continue
        _state["library"] = lib
        _state["action"] = f"loaded {name}"
        return status()
    _state["action"] = "not found: " + ("; ".join(errors[-1:]) if setting.lower() != "auto" else "no system OpenBLAS")
    return status()


def status() -> dict:
    """What BLAS MLX's float32 matmuls call in this process, as a JSON-ready dict:
    ``blas`` (a file), ``kind`` (optimised / reference / platform), ``action`` (what
    preload did), ``setting`` and, for OpenBLAS, its build, core and thread count."""
    out: dict = {"setting": _state.get("setting", os.environ.get(ENV, "auto")),
                 "action": _state.get("action", "not attempted")}
    if not sys.platform.startswith("linux"):
        out.update(blas="the platform's (Accelerate on macOS)", kind="platform")
        return out
    bundled = bundled_blas()
    lib = _state.get("library")
    global_def = _global_cblas_sgemm()
    if lib is not None:
        # loaded into the global scope before mlx: libmlx binds to it
        out.update(blas=global_def, kind="optimised", **_describe(lib))
    elif global_def and ("too late" not in out["action"] or os.environ.get("LD_PRELOAD")):
        # e.g. LD_PRELOAD, or a program that loaded one itself before mlx
        out.update(blas=global_def, kind="optimised" if "openblas" in global_def.lower() else "unknown")
    elif bundled is not None:
        out.update(blas=str(bundled), kind="reference")
    else:
        out.update(blas="MLX's own", kind="unknown")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            out.setdefault("environment", {})[var] = os.environ[var]
    if out["kind"] == "reference":
        action = out["action"]
        if action.startswith("too late"):
            out["fix"] = "import hybridconv before mlx (its import loads the BLAS), or start the process with LD_PRELOAD=libopenblas.so.0"
        elif action.startswith("not loaded"):
            out["fix"] = f"unset {ENV} (or set it to auto)"
        elif out["setting"].lower() not in ("auto", "off"):
            # the user named a library that could not be loaded: that is what to fix
            named = out["setting"]
            why = "no such file" if "/" in named and not os.path.exists(named) else "it could not be loaded as a CBLAS"
            system = _system_openblas()
            out["fix"] = (f"{ENV}={named}: {why}; point it at an existing BLAS library that exports cblas_sgemm"
                          + (f" (the system OpenBLAS is installed: {system})" if system else "")
                          + f", or unset {ENV} to load the system OpenBLAS automatically"
                          + ("" if system else f" once installed ({INSTALL_HINT.split(': ', 1)[1]})"))
        else:
            out["fix"] = INSTALL_HINT
    return out


def warn_if_slow() -> None:
    """Warn once per process (:class:`SlowBlasWarning`) when MLX's float32 products on
    the CPU run on the bundled reference BLAS, saying the fix (``status()["fix"]``):
    called by ``hybridconv.load`` and verify, after MLX is imported. Silent on
    other platforms, on a GPU and when an optimised BLAS is in use."""
    if _state["warned"] or not sys.platform.startswith("linux"):
        return
    try:
        import mlx.core as mx

        if mx.default_device() != mx.cpu:
            return
    except (ImportError, AttributeError):
        return
    info = status()
    if info.get("kind") != "reference":
        return
    _state["warned"] = True
    import warnings

    warnings.warn(
        f"MLX runs its float32 products on the slow bundled reference BLAS ({info.get('blas')}; "
        f"{info.get('action')}), 10-50x slower than an optimised one. Fix: {info.get('fix')}. "
        "`hybridconv doctor` measures it.",
        SlowBlasWarning,
        stacklevel=4,
    )
