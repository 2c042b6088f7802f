"""Error types and exit codes.

Every failure a user can cause (a bad path, a malformed checkpoint, an unknown
architecture, an output folder that already exists) is raised as a
:class:`HybridconvError`. The CLI prints its message and hint without a Python
traceback (``--debug`` shows one) and exits with its ``exit_code``.

Exit codes (documented in ``hybridconv --help`` and the README):

====  =========================================================================
0     success
1     a quality gate failed (``verify``)
2     bad usage or bad input: arguments, missing files, malformed checkpoint or
      config, unknown architecture, a tensor the rules cannot account for
3     the output could not be written (permissions, disk full, ...)
4     refused to publish: no passing verification report for these weights
5     the Hub refused or failed a request, or could not be reached
70    internal error: a bug (rerun with ``--debug`` and report it)
130   interrupted (Ctrl-C); 143: terminated (SIGTERM). Temporary output removed.
====  =========================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_OUTPUT = 3
EXIT_UNVERIFIED = 4
EXIT_HUB = 5
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class HybridconvError(Exception):
    """A failure the user can act on: what is wrong, and what to do next."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(HybridconvError):
    """Bad arguments or options."""


class CheckpointError(HybridconvError):
    """The source checkpoint is missing, malformed or inconsistent."""


class ConfigError(CheckpointError):
    """config.json is missing, unreadable, or has invalid values."""


class UnsupportedArchitectureError(ConfigError):
    """No registered architecture matches the config."""


class LedgerError(CheckpointError):
    """A source tensor was not accounted for, or a model parameter was not filled."""


class OutputError(HybridconvError):
    """The output could not be written."""

    exit_code = EXIT_OUTPUT


class UnverifiedError(HybridconvError):
    """Publishing refused: the folder has no passing verification of its current weights."""

    exit_code = EXIT_UNVERIFIED


class HubError(HybridconvError):
    """The Hub refused or failed a request."""

    exit_code = EXIT_HUB


# The HTTP client libraries huggingface_hub uses (by release: requests, httpx,
# httpx2) raise their own exception classes for a refused connection, a DNS
# failure or a timeout; not all are OSErrors.
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "h2", "socket", "ssl")


def is_network_error(exc: BaseException) -> bool:
    """True for a failure to reach a server (refused, unresolvable, timed out,
    cut off): an ``OSError`` of the socket layer or an HTTP client library's
    transport error, whatever the client."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"HTTPStatusError", "HfHubHTTPError", "HTTPError"} and not names & {"TransportError", "RequestError", "ConnectionError"}:
        return False  # the server answered (with an error status): not a network failure
    for cls in type(exc).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in _NETWORK_MODULES and cls.__name__ not in ("object", "BaseException", "Exception"):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError))
