"""The commands that evaluate a model outside a training run: `attndrift interpolate` (along
pretrained -> fine-tuned) and `attndrift measure` (a checkpoint fine-tuned anywhere). Plain
functions; cli.py registers them on the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from attndrift.clistyle import SetOption
from attndrift.console import drift_text, err, fail, os_error_line, out, safe


def interpolate(
    run_dir: Annotated[Path, typer.Argument(help="a completed run directory")],
    alphas: Annotated[str, typer.Option(
        "--alphas", help="comma-separated alphas in [0, 1]; 0 = pretrained, 1 = fine-tuned")
    ] = "0,0.25,0.5,0.75,1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="evaluation batch")] = 256,
) -> None:
    """Evaluate a run along pretrained -> fine-tuned (WiSE-FT, or scaled LoRA delta): accuracy,
    zero-shot and attention per alpha; writes RUN_DIR/interpolation.json."""
    from attndrift.interpolate import check_alphas

    try:
        values = check_alphas([float(a) for a in alphas.split(",") if a.strip()])
    except ValueError as e:
        fail(f"--alphas {alphas!r}: {e}", 2)
    from attndrift.interpolate import NotATrainingRun, interpolate_run, interpolation_table
    from attndrift.models.errors import ExternalModelError
    from attndrift.runtime import select_device

    try:
        dev = select_device(device)
    except (RuntimeError, ValueError) as e:
        fail(f"--device {device}: {e}", 2)
    try:
        result = interpolate_run(run_dir, values, device=dev, batch_size=batch_size)
    except (NotATrainingRun, ExternalModelError) as e:  # a measured record, a hostile file
        fail(str(e), 2)
    except (KeyError, FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e), 1)
    out.print(interpolation_table(result))
    out.print(f"wrote {safe(run_dir / 'interpolation.json')}", highlight=False, soft_wrap=True)


def measure(
    finetuned: Annotated[str, typer.Argument(
        help="attndrift run dir, save_pretrained CLIP dir or hub id, PEFT adapter dir, or "
             "open_clip checkpoint file")],
    positional: Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE...", help="data.*, probe.* or train.precision overrides, e.g. "
                                       "probe.images=100 (or --set)")] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="the pretrained model (tiny, hub id, local dir); default: a run "
                            "dir's own model")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="dataset whose validation split holds the probe images (default: a "
                       "run dir's own)")] = None,
    zeroshot: Annotated[str | None, typer.Option(
        "--zeroshot", help="comma-separated zero-shot transfer tasks")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="directory for record.json (default: runs/measured/<run id>)")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="auto | run | clip | peft | open_clip")] = "auto",
    open_clip_model: Annotated[str | None, typer.Option(
        "--open-clip-model", help="open_clip architecture of the checkpoint, e.g. ViT-B-32 "
                                  "(checked against the reference)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (default: FINETUNED's name)")] = None,
    recipe: Annotated[str | None, typer.Option(
        help="fine-tuning recipe; checkpoints of one recipe differing in --seed are "
             "replicates (default: the name)")] = None,
    seed: Annotated[int | None, typer.Option(
        help="the fine-tuning seed, for replicates (default: a run's own, else 0)")] = None,
    lr: Annotated[float | None, typer.Option(
        help="the fine-tuning learning rate, if known (default: a run's own)")] = None,
    overrides: SetOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    force: Annotated[bool, typer.Option(
        "--force", help="replace another measurement in --out (never a training run)")] = False,
) -> None:
    """Measure a CLIP fine-tuned anywhere against its pretrained model: attention drift,
    auxiliary metrics, zero-shot of both; writes OUT/record.json (method external).

    Never replaces what it did not write: the same measurement in OUT is reported as already
    measured; a training run, another measurement (unless --force) or other files are refused."""
    from attndrift.config import ConfigError
    from attndrift.measure import (
        OutDirTaken,
        existing_measurement,
        plan_measurement,
        run_measurement,
    )
    from attndrift.models.errors import ExternalModelError
    from attndrift.records import RecordError

    tasks = None if zeroshot is None else [t.strip() for t in zeroshot.split(",") if t.strip()]
    try:
        plan = plan_measurement(finetuned, out_dir, reference=reference, dataset=data,
                                zeroshot=tasks,
                                overrides=[*(positional or []), *(overrides or [])], fmt=fmt,
                                open_clip_model=open_clip_model, name=name, recipe=recipe,
                                seed=seed, lr=lr, device=device, progress=sys.stderr.isatty())
        if existing_measurement(plan, force) is not None:
            out.print(f"already measured: {safe(plan.run_id)} in {safe(plan.out_dir)} "
                      "(nothing rewritten)", highlight=False, soft_wrap=True)
            return
        record = run_measurement(plan, device)
    except (ConfigError, ExternalModelError, FileNotFoundError, OutDirTaken, RecordError) as e:
        fail(str(e), 2)
    except OSError as e:
        fail(os_error_line(e), 1)
    except (KeyError, ValueError, RuntimeError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    _print_measured(record, plan.out_dir)


def _print_measured(record: dict, out_dir: Path) -> None:
    filled = record["provenance"]["finetuned"].get("from_reference")
    if filled:  # a vision-only save: said, as in the record
        err.print("note: not in the checkpoint, taken from the reference: "
                  f"{safe(', '.join(filled))}", highlight=False, soft_wrap=True)
    for warning in record.get("warnings", []):
        err.print(f"[bold yellow]WARNING:[/] {safe(warning)}", highlight=False, soft_wrap=True)
    final, zs = record["final"], record["zeroshot"]
    shots = ", ".join(f"{t} {100 * z['before']:.1f}% → {100 * z['after']:.1f}%"
                      for t, z in zs.items())
    acc = "" if final["test_acc"] is None else f"test {100 * final['test_acc']:.1f}%, "
    out.print(f"[green]measured[/] {safe(record['run_id'])} in "
              f"{record['timing']['total_s']:.1f}s: {acc}{drift_text(final)}, "
              f"zero-shot {safe(shots)} "
              f"-> {safe(out_dir / 'record.json')}", highlight=False, soft_wrap=True)
