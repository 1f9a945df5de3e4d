"""Command line: parses arguments, calls library functions, writes outputs. Nothing else."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from attndrift.cli_models import interpolate, measure
from attndrift.clistyle import App, SetOption
from attndrift.console import drift_text, err, fail, os_error_line, out, safe, sigterm_interrupts

app = App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
          help="Fine-tune CLIP, watch its attention drift, measure what it forgets.\n\n"
               "Config overrides are key=value with dotted keys, given after the config or as "
               "--set key=value (both forms work in run, validate and measure).")


def _version(value: bool) -> None:
    if value:
        from attndrift import __version__

        print(f"attndrift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")
        ] = False) -> None:
    """Fine-tune CLIP, watch its attention drift, measure what it forgets."""


def _study_app() -> typer.Typer:
    from attndrift.study.cli import app as study

    return study


app.add_typer(_study_app(), name="study")



@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML (configs/runs/...)")],
    overrides: Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE...", help="config overrides, dotted keys, e.g. train.lr=1e-4 "
                                       "method=lora")] = None,
    set_: SetOption = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="run directory (default: runs/<run id>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="replace a completed run of another config in --out")] = False,
) -> None:
    """Fine-tune once and write OUT/record.json plus final/best checkpoints.

    A completed run is never redone or overwritten: the same config in OUT is reported as
    already completed; another config's completed run in OUT is refused unless --force. An
    interrupted or killed run in OUT resumes from its last checkpoint. While it runs, OUT is
    claimed (OUT/.lock, the lock a study worker takes): a second run on OUT is refused."""
    from attndrift.config import ConfigError, load_config

    try:
        cfg = load_config(config, [*(overrides or []), *(set_ or [])])
    except ConfigError as e:
        fail(str(e), 2)
    from attndrift.config import identity
    from attndrift.records import run_id_for

    run_id = run_id_for(identity(cfg.model_dump(mode="json")))
    out_dir = out_dir if out_dir is not None else Path("runs") / run_id
    if _already_done(out_dir, run_id, force):
        return
    from attndrift.config import check_downloads

    try:  # a hub model or dataset missing here: in seconds, before anything is written
        check_downloads([cfg], str(config))
    except ConfigError as e:
        fail(str(e), 2)
    from filelock import Timeout

    from attndrift.study.store import claim

    try:
        lock = claim(out_dir)
        lock.acquire(timeout=0)
    except Timeout:
        fail(f"{out_dir} is being run by another process (it holds {out_dir / '.lock'}); "
             "wait for it to finish, or choose another --out", 1)
    except OSError as e:
        fail(os_error_line(e), 1)
    try:
        if _already_done(out_dir, run_id, force):  # finished while we waited for the claim
            return
        record = _train(cfg, out_dir, run_id, quiet)
    finally:
        lock.release()
    _print_run(record, out_dir)


def _already_done(out_dir: Path, run_id: str, force: bool) -> bool:
    from attndrift import runtime

    try:
        done = runtime.completed_record(out_dir, run_id, force=force)
    except runtime.OutDirTaken as e:
        fail(str(e), 2)
    if done is not None:
        out.print(f"already completed: {safe(run_id)} in {safe(out_dir)} (nothing to do; "
                  "another --out runs it again)", highlight=False, soft_wrap=True)
    return done is not None


def _train(cfg, out_dir: Path, run_id: str, quiet: bool) -> dict:
    """`train.run` with the CLI's handling: Ctrl-C/SIGTERM leave a resumable run, failures
    are one line naming the record."""
    from attndrift import runtime, train

    progress = not quiet and sys.stderr.isatty()
    runtime.log_lines = not quiet and not progress
    try:
        with sigterm_interrupts():
            return train.run(cfg, out_dir, progress=progress)
    except KeyboardInterrupt:
        fail(f"interrupted: {run_id} in {out_dir} is resumable; run the same command again to "
             "resume it from its last checkpoint", 130)
    except OSError as e:
        fail(f"{os_error_line(e)} (record: {out_dir / 'record.json'})", 1)
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{e} (record: {out_dir / 'record.json'})", 1)


def _print_run(record: dict, out_dir: Path) -> None:
    for warning in record.get("warnings", []):
        err.print(f"[bold yellow]WARNING:[/] {safe(warning)}", highlight=False, soft_wrap=True)
    final, zs = record["final"], record["zeroshot"]
    if record["status"] != "completed":
        fail(f"run {record['status']}: {record.get('error')} "
              f"(record: {out_dir / 'record.json'})", 1)
    shots = ", ".join(f"{t} {100 * z['before']:.1f}% → {100 * z['after']:.1f}%"
                      for t, z in zs.items())
    out.print(f"[green]completed[/] {safe(record['run_id'])} in "
              f"{record['timing']['total_s']:.1f}s: val {100 * final['best_val_acc']:.1f}%, "
              f"test {100 * final['test_acc']:.1f}%, {drift_text(final)}, "
              f"zero-shot {safe(shots)} -> "
              f"{safe(out_dir)}", highlight=False, soft_wrap=True)


@app.command()
def validate(
    configs: Annotated[list[str], typer.Argument(
        metavar="CONFIG... [KEY=VALUE]...", help="run config YAML files, then overrides "
                                                 "applied to each")],
    set_: SetOption = None,
) -> None:
    """Check run configs without running them.

    Unknown keys, types, ranges, local paths, and whether hub models and datasets are cached
    or downloadable. Every file is checked and reported; the exit status is 2 only when one
    is invalid: a valid config whose model or dataset needs the hub (not cached here) is
    reported as such."""
    from attndrift.config import ConfigError, check_downloads, load_config

    paths = [c for c in configs if "=" not in c or Path(c).is_file()]
    overrides = [c for c in configs if c not in paths] + list(set_ or [])
    if not paths:
        fail("no config file given (usage: attndrift validate CONFIG... [KEY=VALUE]...)", 2)
    invalid = hub = 0
    for path in paths:
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            invalid += 1
            err.print(f"[bold red]error:[/] {safe(e)}", highlight=False, soft_wrap=True)
            continue
        try:
            check_downloads([cfg], path)
        except ConfigError as e:
            if "does not exist" in str(e):  # a wrong hub id: an error wherever it runs
                invalid += 1
                err.print(f"[bold red]error:[/] {safe(e)}", highlight=False, soft_wrap=True)
            else:  # valid, but its model or data must come from the hub first
                hub += 1
                out.print(f"[yellow]needs the hub[/] {safe(e)}", highlight=False,
                          soft_wrap=True)
            continue
        out.print(f"ok {safe(path)}", highlight=False, soft_wrap=True)
    if len(paths) > 1:
        out.print(f"{len(paths) - invalid - hub} ok, {hub} valid but need the hub, "
                  f"{invalid} invalid", highlight=False)
    if invalid:
        raise typer.Exit(2)


@app.command("config-reference")
def config_reference() -> None:
    """Print every run-config key with its default and meaning (docs/config.md)."""
    from attndrift.config import REFERENCE_HEADER, reference_markdown

    print(REFERENCE_HEADER + reference_markdown(), end="")


@app.command()
def compare(run_dirs: Annotated[list[Path], typer.Argument(
        help="run directories, or run stores (every run in them)")]) -> None:
    """Print accuracy, attention drift and zero-shot change of finished runs side by side.
    A run store (a `study run --store` directory, or any directory of run directories) stands
    for the runs in it."""
    from attndrift.compare import print_comparison
    from attndrift.records import RecordError

    run_dirs = [d for given in run_dirs for d in _runs_in(given)]
    try:
        problems = print_comparison(run_dirs, out)
    except RecordError as e:
        fail(str(e), 1)
    for problem in problems:  # listed, not fatal: the readable runs are compared
        err.print(f"[yellow]corrupt, left out:[/] {safe(problem)}", highlight=False,
                  soft_wrap=True)


def _runs_in(path: Path) -> list[Path]:
    """``path`` if it is a run directory (or not a directory: compare says why), else the run
    directories in it (``runs/*`` of a study store, or its subdirectories)."""
    if (path / "record.json").exists() or not path.is_dir():
        return [path]
    root = path / "runs" if (path / "runs").is_dir() else path
    found = sorted(d for d in root.iterdir() if (d / "record.json").exists())
    if not found:
        fail(f"{path} holds no record.json and no run directories; give run directories "
             "(each with a record.json) or a run store", 1)
    return found


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
    early_fraction: Annotated[float, typer.Option(
        help="the predictor analysis's early reading point, a share of training (besides "
             "epoch 1)")] = 0.25,
) -> None:
    """Write report.html (self-contained), report.md and tables/*.csv from run records."""
    if not store.is_dir():
        fail(f"run store {store} is not a directory", 2)
    from attndrift.analysis.predictors import check_early_fraction
    from attndrift.report import build_report

    try:
        check_early_fraction(early_fraction)  # before the store is read
    except ValueError as e:
        fail(f"--early-fraction: {e}", 2)

    try:
        with sigterm_interrupts():  # SIGTERM as Ctrl-C: the staging directory is removed
            result = build_report(store, out_dir, early_fraction)
    except OSError as e:
        fail(os_error_line(e), 1)
    except KeyboardInterrupt:
        fail(f"interrupted: {safe(out_dir)} keeps the report it had", 130)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if not result.counts:
        err.print(f"[yellow]warning:[/] no run directories (with a record.json) under "
                  f"{safe(store)}",
                  highlight=False, soft_wrap=True)
    out.print(f"report: {safe(result.html)} ({counts or 'no runs'}; {len(result.tables)} tables, "
              f"{len(result.figures)} figures, {result.seconds:.1f}s)", highlight=False,
              soft_wrap=True)


app.command()(interpolate)
app.command()(measure)


@app.command()
def forecast(
    run_dirs: Annotated[list[Path], typer.Argument(help="runs to forecast (new or running)")],
    store: Annotated[Path, typer.Option("--store", help="store of finished runs to calibrate on")],
    epoch: Annotated[float, typer.Option(help="read the signals after this epoch")] = 1.0,
    fraction: Annotated[float | None, typer.Option(
        help="read them at this share of training instead")] = None,
) -> None:
    """Forecast the runs' final zero-shot retention from an early point, calibrated on STORE."""
    from attndrift.analysis.forecast import forecast_lines

    if not store.is_dir():
        fail(f"no run store at {store}; give --store the directory of finished runs", 2)
    point = ("fraction", fraction) if fraction is not None else ("epoch", epoch)
    for line in forecast_lines(store, run_dirs, point):
        out.print(safe(line), highlight=False, soft_wrap=True)


def main() -> None:
    app()
