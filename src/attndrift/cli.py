"""Command line: parses arguments, calls library functions, writes outputs. Nothing else."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from attndrift.console import err, fail, out

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune CLIP, watch its attention drift, measure what it forgets.")


def _study_app() -> typer.Typer:
    from attndrift.study.cli import app as study

    return study


app.add_typer(_study_app(), name="study")



WRITE_ERRNOS = {13, 28, 30, 122}  # EACCES, ENOSPC, EROFS, EDQUOT


def os_error_line(e: OSError) -> str:
    """An `OSError` as one line naming the path and the cause (full disk, read-only, ...)."""
    if e.filename is None:
        return str(e)
    verb = "cannot write " if e.errno in WRITE_ERRNOS else ""
    return f"{verb}{e.filename}: {e.strerror}"


def drift_text(final: dict) -> str:
    """Δ entropy as `compare` and the report read it (the mean over the fixed probe subsets,
    002), with probe subset 0's value labelled next to it (issue 22 item 7)."""
    first = (final.get("delta_pct") or {}).get("entropy")
    mean = (final.get("delta_pct_subset_mean") or {}).get("entropy")
    if not isinstance(mean, int | float):
        return f"Δentropy {first:+.2f}% (probe subset 0)"
    return f"Δentropy {mean:+.2f}% (subset mean; subset 0: {first:+.2f}%)"


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (kill, a scheduler's preemption) stops a run as Ctrl-C does: resumable."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML (configs/runs/...)")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides, dotted keys, e.g. train.lr=1e-4 method=lora")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="run directory (default: runs/<run id>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="replace a completed run of another config in --out")] = False,
) -> None:
    """Fine-tune once and write OUT/record.json plus final/best checkpoints.

    A completed run is never redone or overwritten: the same config in OUT is reported as
    already completed; another config's completed run in OUT is refused unless --force. An
    interrupted or killed run in OUT resumes from its last checkpoint."""
    from attndrift.config import ConfigError, check_downloads, identity, load_config
    from attndrift.records import run_id_for

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        fail(str(e), 2)
    from attndrift import runtime, train

    run_id = run_id_for(identity(cfg.model_dump(mode="json")))
    out_dir = out_dir if out_dir is not None else Path("runs") / run_id
    try:
        done = runtime.completed_record(out_dir, run_id, force=force)
    except runtime.OutDirTaken as e:
        fail(str(e), 2)
    if done is not None:
        out.print(f"already completed: {run_id} in {out_dir} (nothing to do; another --out "
                  "runs it again)", highlight=False, soft_wrap=True)
        return
    try:  # a hub model or dataset missing here: in seconds, before anything is recorded
        check_downloads([cfg], str(config))
    except ConfigError as e:
        fail(str(e), 2)
    progress = not quiet and sys.stderr.isatty()
    runtime.log_lines = not quiet and not progress
    try:
        with sigterm_interrupts():
            record = train.run(cfg, out_dir, progress=progress)
    except KeyboardInterrupt:
        fail(f"interrupted: {run_id} in {out_dir} is resumable; run the same command again to "
             "resume it from its last checkpoint", 130)
    except OSError as e:
        fail(f"{os_error_line(e)} (record: {out_dir / 'record.json'})", 1)
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{e} (record: {out_dir / 'record.json'})", 1)
    for warning in record.get("warnings", []):
        err.print(f"[bold yellow]WARNING:[/] {warning}", highlight=False, soft_wrap=True)
    final, zs = record["final"], record["zeroshot"]
    if record["status"] != "completed":
        fail(f"run {record['status']}: {record.get('error')} "
              f"(record: {out_dir / 'record.json'})", 1)
    shots = ", ".join(f"{t} {100 * z['before']:.1f}% → {100 * z['after']:.1f}%"
                      for t, z in zs.items())
    out.print(f"[green]completed[/] {record['run_id']} in {record['timing']['total_s']:.1f}s: "
              f"val {100 * final['best_val_acc']:.1f}%, test {100 * final['test_acc']:.1f}%, "
              f"{drift_text(final)}, zero-shot {shots} -> {out_dir}", highlight=False)


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="run config YAML files")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="key=value override")] = None,
) -> None:
    """Check run configs without running them (unknown keys, types, ranges, local paths, and
    that hub models and datasets are cached or downloadable)."""
    from attndrift.config import ConfigError, check_downloads, load_config

    for path in configs:
        try:
            check_downloads([load_config(path, overrides or [])], str(path))
        except ConfigError as e:
            fail(str(e), 2)
        out.print(f"ok {path}")


@app.command("config-reference")
def config_reference() -> None:
    """Print every run-config key with its default and meaning (docs/config.md)."""
    from attndrift.config import REFERENCE_HEADER, reference_markdown

    print(REFERENCE_HEADER + reference_markdown(), end="")


@app.command()
def compare(run_dirs: Annotated[list[Path], typer.Argument(help="run directories")]) -> None:
    """Print accuracy, attention drift and zero-shot change of finished runs side by side."""
    from attndrift.compare import print_comparison
    from attndrift.records import RecordError

    try:
        problems = print_comparison(run_dirs, out)
    except RecordError as e:
        fail(str(e), 1)
    for problem in problems:  # listed, not fatal: the readable runs are compared
        err.print(f"[yellow]corrupt, left out:[/] {problem}", highlight=False, soft_wrap=True)


@app.command("pretrain-tiny")
def pretrain_tiny(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for weights, tokenizer, card")],
    steps: Annotated[int, typer.Option(min=1)] = 1500,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
) -> None:
    """Pretrain the tiny CLIP on the shapes world (how the shipped model was made)."""
    from attndrift.pretrain import pretrain_tiny as _pretrain

    result = _pretrain(out_dir, steps=steps, seed=seed, batch_size=batch_size,
                       progress=sys.stderr.isatty())
    out.print(result)


@app.command()
def report(
    store: Annotated[Path, typer.Argument(help="run store: a directory holding run directories")],
    out_dir: Annotated[Path, typer.Option("--out", help="report directory")] = Path("report"),
) -> None:
    """Write report.html (self-contained), report.md and tables/*.csv from run records."""
    if not store.is_dir():
        fail(f"run store {store} is not a directory", 2)
    from attndrift.report import build_report

    try:
        result = build_report(store, out_dir)
    except OSError as e:
        fail(os_error_line(e), 1)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if not result.counts:
        err.print(f"[yellow]warning:[/] no run directories (with a record.json) under {store}",
                  highlight=False, soft_wrap=True)
    out.print(f"report: {result.html} ({counts or 'no runs'}; {len(result.tables)} tables, "
              f"{len(result.figures)} figures, {result.seconds:.1f}s)", highlight=False,
              soft_wrap=True)


@app.command()
def interpolate(
    run_dir: Annotated[Path, typer.Argument(help="a completed run directory")],
    alphas: Annotated[str, typer.Option(
        "--alphas", help="comma-separated alphas in [0, 1]; 0 = pretrained, 1 = fine-tuned")
    ] = "0,0.25,0.5,0.75,1",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="evaluation batch")] = 256,
) -> None:
    """Evaluate a run along pretrained -> fine-tuned (WiSE-FT, or scaled LoRA delta): accuracy,
    zero-shot and attention per alpha; writes RUN_DIR/interpolation.json."""
    from attndrift.interpolate import check_alphas

    try:
        values = check_alphas([float(a) for a in alphas.split(",") if a.strip()])
    except ValueError as e:
        fail(f"--alphas {alphas!r}: {e}", 2)
    from attndrift.interpolate import interpolate_run, interpolation_table

    try:
        result = interpolate_run(run_dir, values, device=device, batch_size=batch_size)
    except (KeyError, FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e), 1)
    out.print(interpolation_table(result))
    out.print(f"wrote {run_dir / 'interpolation.json'}", highlight=False, soft_wrap=True)


@app.command()
def measure(
    finetuned: Annotated[str, typer.Argument(
        help="attndrift run dir, save_pretrained CLIP dir or hub id, PEFT adapter dir, or "
             "open_clip checkpoint file")],
    reference: Annotated[str | None, typer.Option(
        "--reference", help="the pretrained model (tiny, hub id, local dir); default: a run "
                            "dir's own model")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="dataset whose validation split holds the probe images (default: a "
                       "run dir's own)")] = None,
    zeroshot: Annotated[str | None, typer.Option(
        "--zeroshot", help="comma-separated zero-shot transfer tasks")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for record.json")] = Path(
        "runs/measured"),
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
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="data.*, probe.* or train.precision override, e.g. probe.images=100")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Measure a CLIP fine-tuned anywhere against its pretrained model: attention drift,
    auxiliary metrics, zero-shot of both; writes OUT/record.json (method external)."""
    from attndrift.config import ConfigError
    from attndrift.measure import measure as _measure
    from attndrift.models.external import ExternalModelError

    tasks = None if zeroshot is None else [t.strip() for t in zeroshot.split(",") if t.strip()]
    try:
        record = _measure(finetuned, out_dir, reference=reference, dataset=data,
                          zeroshot=tasks, overrides=overrides or [], fmt=fmt,
                          open_clip_model=open_clip_model, name=name, recipe=recipe,
                          seed=seed, lr=lr, device=device, progress=sys.stderr.isatty())
    except (ConfigError, ExternalModelError, FileNotFoundError) as e:
        fail(str(e), 2)
    except (KeyError, ValueError, RuntimeError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    for warning in record.get("warnings", []):
        err.print(f"[bold yellow]WARNING:[/] {warning}", highlight=False, soft_wrap=True)
    final, zs = record["final"], record["zeroshot"]
    shots = ", ".join(f"{t} {100 * z['before']:.1f}% → {100 * z['after']:.1f}%"
                      for t, z in zs.items())
    acc = "" if final["test_acc"] is None else f"test {100 * final['test_acc']:.1f}%, "
    out.print(f"[green]measured[/] {record['run_id']} in {record['timing']['total_s']:.1f}s: "
              f"{acc}{drift_text(final)}, zero-shot {shots} "
              f"-> {out_dir / 'record.json'}", highlight=False, soft_wrap=True)


def main() -> None:
    app()
