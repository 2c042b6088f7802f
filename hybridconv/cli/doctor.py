"""``hybridconv doctor``: is MLX computing at this machine's speed?"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import app, console
from .options import JsonOpt


@app.command("doctor")
def doctor_cmd(
    json_out: JsonOpt = False,
    no_torch: Annotated[bool, typer.Option("--no-torch", help="Do not measure torch (it is not imported).")] = False,
):
    """Report the BLAS that MLX calls and measure this machine's matrix products.

    Shows the BLAS library behind MLX's float32 products (the mlx[cpu] wheel on Linux
    bundles the slow reference BLAS; hybridconv loads the system OpenBLAS before MLX
    when it is installed, HYBRIDCONV_BLAS=off disables that), measured GFLOP/s of MLX
    float32, bfloat16 and 4-bit products and of torch float32 (if installed), the
    arithmetic `verify` uses for low-precision folders here, and the fix when MLX is
    on the slow path. Always exits 0.
    """
    from ..verify.speed import doctor

    with console.status("measuring matrix products"):
        report = doctor(with_torch=not no_torch)
    if json_out:
        console.print_json(json.dumps(report))
        return
    b = report["blas"]
    head = Table(title="hybridconv doctor", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    m = report["machine"]
    head.add_row("machine", escape(f"{m['platform']}, {m['cpus']} CPU(s), {m['processor']}"))
    head.add_row("mlx", f"{report['mlx']['version']} on the {report['mlx']['device']}")
    blas_line = f"{b.get('blas')} [{b.get('kind')}]"
    if b.get("core"):
        blas_line += f", core {b['core']}, {b.get('threads')} thread(s)"
    head.add_row("BLAS for MLX", escape(blas_line))
    head.add_row("how", escape(f"{b.get('action')} (HYBRIDCONV_BLAS={b.get('setting')})"))
    if b.get("environment"):
        head.add_row("environment", escape(", ".join(f"{k}={v}" for k, v in b["environment"].items())))
    vc = report["verify_compute"]
    head.add_row("verify of bf16/fp16/N-bit", escape(f"{vc['low_precision_folders']}: {vc['why']}"))
    console.print(head)
    s = report["shape"]
    t = Table(title=f"measured GFLOP/s ([{s['M']}, {s['K']}] @ [{s['K']}, {s['N']}])")
    t.add_column("library")
    t.add_column("product")
    t.add_column("GFLOP/s", justify="right")
    labels = {"float32": "float32 (BLAS)", "bfloat16": "bfloat16 (MLX kernel)", "4bit": "4-bit affine (MLX kernel)",
              "4bit_as_float32": "4-bit dequantized to float32 (verify's float32 path)"}
    for name, gf in report["gflops"]["mlx"].items():
        t.add_row("mlx", labels.get(name, name), f"{gf:.1f}")
    tr = report["gflops"]["torch"]
    if tr:
        t.add_row(f"torch {tr['version']}", f"float32 ({tr['threads']} thread(s))", f"{tr['float32']:.1f}")
    else:
        t.add_row("torch", "not measured" + (" (--no-torch)" if no_torch else " (not installed)"), "")
    console.print(t)
    for f in report["findings"]:
        console.print(f"[bold red]slow:[/] {escape(f['problem'])}", soft_wrap=True)
        console.print(f"[yellow]fix:[/] {escape(f['fix'])}", soft_wrap=True)
    if not report["findings"]:
        console.print("[green]MLX's float32 products run at this machine's BLAS speed[/]")
