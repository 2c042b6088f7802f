"""The ``hybridconv`` command line: thin Typer commands over the library.

Each command parses options, calls the library and renders with Rich. Errors
the user can act on are printed without a traceback (``--debug`` or
``HYBRIDCONV_DEBUG=1`` shows one). torch is never imported here.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__
from .. import interrupt
from ..blas import SlowBlasWarning
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, HybridconvError
from ..interrupt import Terminated

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 quality gate failed (verify); 2 bad usage or bad input "
    "(arguments, missing or malformed checkpoint/config, unknown architecture, a tensor "
    "the rules cannot account for, an existing output without --force); 3 output could not "
    "be written (permissions, disk full); 4 publishing refused (not verified, or weights "
    "changed since); 5 the Hub refused, failed or could not be reached; 70 internal error (a "
    "bug: rerun with --debug and report it); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)


def reflow(doc: str | None) -> str | None:
    """A docstring as help text: each paragraph's lines joined, so that the terminal
    wraps sentences where it needs to instead of keeping the source's line breaks
    (which broke sentences in the middle at 80 columns)."""
    if not doc:
        return doc
    import inspect

    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


class _App(typer.Typer):
    """typer.Typer whose commands' docstrings are reflowed (:func:`reflow`)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(f):
            f.__doc__ = reflow(f.__doc__)
            return register(f)

        return decorator

def _hide_flag_types() -> None:
    """typer shows ``<bool>`` beside every on/off flag (--force, --debug, --help);
    a flag takes no value, so its help row shows none. Older typer releases have no
    such hook (and show no ``<bool>``): nothing to do there."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer without the rich help core
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) or getattr(self, "is_bool_flag", False) else original(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()

app = _App(
    name="hybridconv",
    help=(
        "Convert hybrid Hugging Face checkpoints (Mamba, Mamba-2, PLaMo-2, RecurrentGemma, Jamba, Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1, Zamba, Zamba2, ZAYA1, LFM2, LFM3, Inkling, Inkling-2 (and -Mini, looped), Qwen3-Next, Qwen3.5, OLMo-Hybrid, Kimi-Linear, Lara-Mini, MiniMax-Text-01, Ling-3, RWKV-4, xLSTM, Qwen4-Exp, GLM-5.3-Flash, and the language models of their multimodal releases; `inspect` on any checkpoint says if it is supported) to MLX, quantize them, verify them against the PyTorch original and publish them, "
        "checking every tensor on the way.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": False}


def _on_signal(signum, frame):  # pragma: no cover - exercised via subprocess
    # Only recorded: the library raises at its next safe point (see hybridconv.interrupt).
    interrupt.request(signum)


def _version(value: bool):
    if value:
        console.print(f"hybridconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show Python tracebacks for errors.")
    ] = False,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
):
    _state["debug"] = debug or os.environ.get("HYBRIDCONV_DEBUG") == "1"


def _usage_error(exc) -> None:
    """A usage error in hybridconv's own voice (``error:`` / ``hint:``), without
    the validation library's wording ("Value error, …") or a blank line first."""
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    for noise in ("Value error, ", "Input should be "):
        message = message.replace(noise, "expected " if noise.startswith("Input") else "")
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "hybridconv"
    if not message.strip():
        return  # no command given: the help was printed, there is nothing more to say
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    err_console.print(f"[yellow]hint:[/] see `{escape(command)} --help`", highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hybridconv's warnings in its own voice on stderr (``warning:``), without the
    file and line Python shows; other libraries' warnings as Python shows them."""
    if not issubclass(category, SlowBlasWarning):
        return _python_showwarning(message, category, filename, lineno, file, line)
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


_python_showwarning = warnings.showwarning


def main() -> None:
    from . import convert as _convert  # noqa: F401  (register commands)
    from . import doctor as _doctor  # noqa: F401
    from . import inspect as _inspect  # noqa: F401
    from . import publish as _publish  # noqa: F401
    from . import quantize as _quantize  # noqa: F401
    from . import verify as _verify  # noqa: F401

    interrupt.reset()
    # A signal the parent made us ignore (a background job: `cmd &` in a script
    # ignores SIGINT) stays ignored, as Python itself does.
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", SlowBlasWarning)
            warnings.showwarning = _show_warning
            rc = app(standalone_mode=False)
        # A signal that came after the last safe point: the work finished (outputs are
        # written atomically), but the caller asked us to stop, so say so in the code.
        signum = interrupt.pending()
        if signum is not None and not interrupt.acted():
            name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
            err_console.print(f"[red]{'interrupted' if signum == signal.SIGINT else 'terminated'}[/] ({name}) after "
                              "the work had finished: its output is complete and was kept", highlight=False)
            sys.exit(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED)
        interrupt.check()  # stopped at a safe point (typer turns KeyboardInterrupt into exit 130): say so
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except HybridconvError as exc:
        if _state["debug"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("[red]interrupted[/]: temporary output removed")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        err_console.print("[red]terminated[/]: temporary output removed")
        sys.exit(EXIT_TERMINATED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and genuine bugs
        show = getattr(exc, "show", None)  # click/typer usage errors (typer vendors click)
        if callable(show) and hasattr(exc, "exit_code"):
            _usage_error(exc)
            sys.exit(2)
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
            "this is a bug in hybridconv; rerun with --debug for a traceback and report it",
            highlight=False,
        )
        sys.exit(EXIT_INTERNAL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
