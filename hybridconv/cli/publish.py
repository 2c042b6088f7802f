"""``hybridconv upload`` and ``hybridconv release``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..errors import EXIT_GATE_FAILED
from . import app, console, err_console
from .options import StreamOpt
from .render import human_bytes


@app.command("upload")
def upload_cmd(
    out: Annotated[Path, typer.Argument(help="The converted (and verified) folder.", show_default=False)],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Target Hub repository, ORG/NAME.", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to upload to (created if missing).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and show the card; contact nothing.")] = False,
    allow_unverified: Annotated[bool, typer.Option("--allow-unverified", help="Upload without a passing verification (loud warning; the card says 'unverified').")] = False,
    card_template: Annotated[Optional[Path], typer.Option("--card-template", help="An edited copy of the model card template ({placeholders} are filled).", show_default=False)] = None,
    large_folder: Annotated[bool, typer.Option("--large-folder", help="Use huggingface_hub's resumable multi-commit upload (big models).")] = False,
):
    """Publish OUT to the Hugging Face Hub, only if it was verified.

    Refuses unless OUT/verification.json passed and its weights hash matches OUT's current
    weight files. Writes the model card (README.md) into OUT. The token comes from HF_TOKEN or
    the huggingface_hub login and is never printed.

    Exit codes: 0 uploaded (or dry run); 2 bad usage (also a folder hybridconv did not
    write); 4 refused (unverified, failed or tampered); 5 the Hub refused the upload,
    failed, or could not be reached (its or the network's message is shown).
    """
    from ..publish.upload import upload

    res = upload(out, repo_id, private, revision, dry_run, allow_unverified, card_template, large_folder)
    for w in res.warnings:
        err_console.print(f"[bold red on yellow] WARNING [/] {escape(w)}")
    visibility = "private" if private else "public"
    t = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo_id}" + (f" @ {revision}" if revision else "")
              + f" ({visibility} repository{' if created' if dry_run else ''})")
    t.add_column("file")
    t.add_column("size", justify="right")
    for name, size in res.files:
        t.add_row(name, human_bytes(size))
    console.print(t)
    if dry_run:
        console.print(Panel(escape(res.card), title="model card (README.md)"))
        console.print("[dim]--dry-run: nothing uploaded, nothing written[/]")
    else:
        console.print(f"[green]done[/] {escape(res.commit_url or '')}")


@app.command("release")
def release_cmd(
    plan: Annotated[Path, typer.Argument(help="Release plan, TOML or YAML (schema: README, 'release').", show_default=False)],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Where variants and the reference are built \\[default: release-<plan name> beside the plan].", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan: steps, sizes, what would be uploaded where.")] = False,
    no_upload: Annotated[bool, typer.Option("--no-upload", help="Build and verify, but upload nothing.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the release summary as JSON here; - writes it to stdout (the log and table then go to stderr).", show_default=False)] = None,
    stream: StreamOpt = None,
):
    """Build, verify and publish every variant of a release plan.

    Per variant: convert or quantize -> verify (against one PyTorch reference run, stored
    as a reference-logits file and reused by every variant) -> upload. A variant that fails
    its gate is never uploaded. Finished steps whose inputs are unchanged are skipped on a
    rerun. One release runs in a work folder at a time. The summary ends every run that
    got past the plan's checks, saying which variants were done. The reference and each
    verification run the model whole when it fits in half the memory, else one block at a
    time (--stream / --no-stream force it).

    Exit codes: 0 every variant passed (and was uploaded); 1 a variant failed; 2 bad plan
    (or the work folder is in use by another release run); 3 an output could not be written
    (disk full: the path and the space needed are named); 5 the Hub: no token, or an upload
    the Hub refused or that could not reach it (the other variants still run; the summary
    says which were done); 130/143 interrupted (a rerun resumes).
    """
    from ..publish.release import load_plan, run_release

    to_stdout = json_path is not None and str(json_path) == "-"
    screen = err_console if to_stdout else console  # stdout carries the JSON alone
    rp = load_plan(plan)
    summary = run_release(rp, workdir, dry_run=dry_run, upload=not no_upload, log=lambda m: screen.print(escape(m), soft_wrap=True),
                          stream=stream)
    if to_stdout:
        import sys

        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        sys.stdout.flush()
    elif json_path:
        try:
            json_path.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            from ..convert import output_error

            raise output_error(json_path, exc) from None
    t = Table(title=f"release {rp.name}" + (" (dry run)" if dry_run else ""))
    for col in ("variant", "build", "size", "verify", "KL mean", "upload", "repo"):
        t.add_column(col)
    for v in summary["variants"]:
        t.add_row(v["name"], v["build"], human_bytes(v["bytes"]) if v.get("bytes") else "",
                  v["verify"], f"{v['kl_mean']:.3g}" if v.get("kl_mean") is not None else "",
                  v["upload"], v.get("repo_id") or "")
    screen.print(t)
    screen.print(f"reference: {summary['reference']}")
    if not dry_run:
        done, not_done = summary.get("done", []), summary.get("not_done", [])
        screen.print(f"done: {escape(', '.join(done) or 'none')}; not done: {escape(', '.join(not_done) or 'none')}",
                     highlight=False)
        for v in summary["variants"]:
            if v.get("failed"):
                screen.print(f"[red]{escape(v['name'])}:[/] {escape('; '.join(v.get('reasons') or []))}",
                             highlight=False, soft_wrap=True)
    code = summary.get("exit_code", 0 if summary["ok"] else EXIT_GATE_FAILED)
    if code:
        raise typer.Exit(code)
