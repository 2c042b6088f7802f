"""``upload``: publish a verified folder to the Hub with huggingface_hub.

Refuses unless OUT holds a passing ``verification.json`` whose weights hash
matches OUT's current weight files and the model file it carries for mlx-lm
(:func:`hybridconv.hashing.weights_hash`): changed code fails like changed weights. The token comes from ``HF_TOKEN`` or the
huggingface_hub login (``get_token``) and is never printed: every message that
leaves this module passes through :func:`scrub`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubError, UnverifiedError, UsageError, is_network_error
from ..hashing import weights_hash
from .card import render_card

REPORT = "verification.json"
IGNORE = [".*", "*.partial", "__pycache__/*"]


@dataclass
class UploadResult:
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]
    card: str
    verified: bool
    dry_run: bool
    commit_url: str | None = None
    warnings: list[str] = field(default_factory=list)


def token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def scrub(text: str, secret: str | None = None) -> str:
    secret = secret if secret is not None else token()
    return text.replace(secret, "***") if secret else text


def check_verified(out: Path) -> dict:
    """The passing report of OUT's current weights, or UnverifiedError saying why."""
    out = Path(out)
    path = out / REPORT
    fix = f"run `hybridconv verify {out} --reference SOURCE` (or --reference-logits FILE) first"
    if not path.is_file():
        raise UnverifiedError(f"{out}: no {REPORT}: these weights were never verified", fix)
    try:
        report = json.loads(path.read_text())
        recorded = report["model"]["weights_hash"]
        verdict = report["verdict"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UnverifiedError(f"{path}: unreadable or not a hybridconv verification report", fix) from None
    if verdict != "pass":
        reasons = "; ".join(report.get("failure_reasons") or [])
        raise UnverifiedError(f"{out}: verification failed ({reasons})", "fix the conversion, then verify again")
    current = weights_hash(out)
    if current != recorded:
        raise UnverifiedError(
            f"{out}: the weights or the model code it carries changed after verification "
            f"(verified {recorded[:19]}…, now {current[:19]}…)",
            fix,
        )
    return report


def upload(
    out: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    allow_unverified: bool = False,
    card_template: Path | None = None,
    large_folder: bool = False,
    endpoint: str | None = None,
) -> UploadResult:
    """`hybridconv upload`: publish a verified hybridconv output to ``repo_id`` (refused,
    exit 4, without a passing report of its current weights unless ``allow_unverified``;
    only hybridconv outputs, whatever the flags). ``dry_run`` contacts nothing."""
    from ..checkpoint import REPO_ID

    out = Path(out)
    if not (out / "config.json").is_file():
        raise UsageError(f"{out}: not a converted folder (no config.json)")
    from ..convert import is_hybridconv_output

    if not is_hybridconv_output(out):
        # whatever the flags: a raw PyTorch checkpoint must never be published as an MLX model
        raise UsageError(
            f"{out}: not a hybridconv output (no conversion.json written by hybridconv); upload publishes only "
            "what `hybridconv convert` or `hybridconv quantize` wrote",
            f"convert it first: hybridconv convert {out} -o {out}-mlx",
        )
    if not REPO_ID.match(repo_id):
        raise UsageError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    warnings: list[str] = []
    verified = True
    try:
        check_verified(out)
    except UnverifiedError as exc:
        if not allow_unverified:
            raise
        verified = False
        warnings.append(f"UPLOADING UNVERIFIED WEIGHTS: {exc.message}. The model card says so.")
    card = render_card(out, repo_id, card_template, unverified=not verified)
    if not dry_run:
        (out / "README.md").write_text(card, encoding="utf-8")
    files = sorted(
        (str(p.relative_to(out)), p.stat().st_size)
        for p in out.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)
    )
    if "README.md" not in {f for f, _ in files}:
        files.append(("README.md", len(card.encode())))
        files.sort()
    result = UploadResult(repo_id, revision, files, card, verified, dry_run, warnings=warnings)
    if dry_run:
        return result
    secret = token()
    if not secret:
        raise HubError(
            "no Hugging Face token",
            "set HF_TOKEN (e.g. from a CI secret) or run `hf auth login`",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=secret)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if large_folder:  # resumable, multi-commit
            api.upload_large_folder(repo_id=repo_id, folder_path=str(out), revision=revision,
                                    repo_type="model", ignore_patterns=IGNORE)
            result.commit_url = None
        else:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(out),
                revision=revision,
                commit_message=f"Upload {out.name} (hybridconv, {'verified' if verified else 'UNVERIFIED'})",
                ignore_patterns=IGNORE,
            )
            result.commit_url = getattr(info, "commit_url", None)
    except HfHubHTTPError as exc:
        raise HubError(scrub(f"{repo_id}: the Hub refused the upload ({exc})", secret)) from None
    except Exception as exc:  # noqa: BLE001  (sorted below: network, bad answers, or a bug)
        if is_network_error(exc):
            raise HubError(
                scrub(f"{repo_id}: the Hub could not be reached at {api.endpoint} "
                      f"({type(exc).__name__}: {exc}); nothing was uploaded", secret),
                "check the network (and HF_ENDPOINT, if set), then run the same command again",
            ) from None
        if isinstance(exc, (OSError, ValueError)):  # answers the client cannot use
            raise HubError(scrub(f"{repo_id}: upload failed ({exc})", secret)) from None
        raise
    return result
