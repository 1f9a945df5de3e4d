"""`attndrift study run | status`: thin commands over spec, store and executor."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from attndrift.clistyle import App
from attndrift.console import fail, os_error_line, out, safe, sigterm_interrupts
from attndrift.study import MAX_RUNS

app = App(no_args_is_help=True, help="Declarative experiment matrices.")

MaxRuns = Annotated[int, typer.Option(
    "--max-runs", min=1, help="refuse a study that expands to more runs than this")]



def status_rows(store) -> list[dict]:
    """One row per run of the store's manifest. Reads only: a run it cannot read is listed
    ``corrupt`` (or ``unreadable``) with the reason, never a traceback."""
    rows = []
    for entry in store.manifest()["runs"]:
        run_id, group = entry["run_id"], str(entry.get("group", ""))
        try:
            state = store.state(run_id)
            status, error = state.status, state.error
            if status in ("running", "pending", "interrupted") and store.is_locked(run_id):
                status = "running"
            elif status == "running":
                status = "interrupted"  # started, nobody holds it: the next study run resumes it
        except ValueError as e:  # a hand-edited run id that is no directory name
            status, error = "corrupt", str(e)
        except (OSError, RecursionError) as e:
            status, error = "unreadable", f"{type(e).__name__}: {str(e)[:200]}"
        rows.append({"run_id": run_id, "group": group, "status": status, "error": error})
    return rows


def _gpu_ids(gpus: str | None, backend: str, workers: int) -> list[str] | None:
    """``--gpus`` as ids, checked against the backend, the workers and the visible GPUs."""
    gpu_ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    if gpu_ids is not None:
        from attndrift.study.executor import visible_gpus

        if backend != "local" or workers < 2:
            fail("--gpus spreads local workers: it needs --backend local and --workers 2 or "
                 "more (one run in this process uses its config's device, e.g. device=cuda:1)", 2)
        visible = visible_gpus()
        unknown = [g for g in gpu_ids if g not in visible]
        if unknown:
            fail(f"--gpus {gpus}: {', '.join(unknown)} not among the visible GPUs "
                 f"({', '.join(visible) or 'none: torch sees no CUDA device'})", 2)
    return gpu_ids


def _progress(counts: dict[str, int], total: int, workers: int):
    """The per-run progress line: done/total, status, duration, counts, runs left, ETA."""
    durations: list[float] = []

    def report(o) -> None:
        if o.status in counts:
            counts[o.status] += 1
        elif o.status == "skipped-done":  # completed by another worker while we looked
            counts["completed"] += 1
        if o.status not in ("skipped-done", "skipped-busy"):
            durations.append(o.seconds)
        done = min(total, sum(counts.values()))
        left = total - done
        eta = (sum(durations) / len(durations)) * left / max(1, workers) if durations else 0
        colour = {"completed": "green", "failed": "red", "diverged": "yellow"}.get(o.status, "")
        tag = f"[{colour}]{o.status}[/]" if colour else o.status
        why = f" ({safe(o.error)})" if o.error and o.status != "completed" else ""
        out.print(f"[{done}/{total}] {tag} {o.run_id} {o.seconds:.1f}s{why} | "
                  f"failed {counts['failed']}, diverged {counts['diverged']}, "
                  f"left {left}, ETA {eta:.0f}s", highlight=False, soft_wrap=True)

    return report


def _summarise(store, name: str, outcomes: list, seconds: float, resume: str) -> None:
    """The closing line, and exit 1 unless every run of the study is completed."""
    busy = [o.run_id for o in outcomes if o.status == "skipped-busy"]
    rows = status_rows(store)
    done = sum(r["status"] == "completed" for r in rows)
    bad = [r for r in rows if r["status"] in ("failed", "diverged", "corrupt")]
    unfinished = [r for r in rows if r["status"] not in ("completed", "failed", "diverged",
                                                          "corrupt")]
    out.print(f"study {name}: {done}/{len(rows)} completed, "
              f"{len(bad)} failed or diverged, {len(busy)} held by other workers, "
              f"{seconds:.1f}s", highlight=False)
    # never report success while a run is not completed
    if bad:
        fail(f"{len(bad)} run(s) did not complete: {', '.join(r['run_id'] for r in bad)}; "
              "see `attndrift study status` and rerun with --retry-failed", 1)
    if unfinished:
        held = [r["run_id"] for r in unfinished if r["status"] == "running"]
        fail(f"{len(unfinished)} run(s) not completed yet: "
             f"{', '.join(r['run_id'] + ' (' + r['status'] + ')' for r in unfinished)}; "
             + ("another worker holds " + ", ".join(held) + "; " if held else "")
             + f"`{resume}` runs or resumes them", 1)


def _counts(store, planned: list, retry_failed: bool) -> dict[str, int]:
    """Runs already completed, failed and diverged; failed and diverged ones count as done
    only when they are not run again."""
    counts = {"completed": 0, "failed": 0, "diverged": 0}
    for p in planned:
        s = store.state(p.run_id).status
        if s == "completed" or (s in counts and not retry_failed):
            counts[s] += 1
    return counts


@app.command("run")
def run_cmd(
    study: Annotated[Path, typer.Argument(help="study YAML (configs/studies/...)")],
    store_dir: Annotated[Path, typer.Option("--store", help="run store directory")],
    workers: Annotated[int, typer.Option(min=1, help="parallel runs (local backend)")] = 1,
    backend: Annotated[str, typer.Option(help="local | ray")] = "local",
    retry_failed: Annotated[bool, typer.Option("--retry-failed",
                                               help="rerun failed and diverged runs")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPUs per run")] = 0.0,
    cpus_per_run: Annotated[float, typer.Option(help="Ray: CPUs per run")] = 1.0,
    gpus: Annotated[str | None, typer.Option(
        help="local backend, --workers > 1: GPU ids to spread the workers over, e.g. 0,1; "
             "workers beyond the GPU count share them (default: every visible GPU)")] = None,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads per run (default: $ATTNDRIFT_THREADS, else $OMP_NUM_THREADS, "
             "else cores // workers); give each of two `study run` processes on one machine "
             "half the cores")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the runs only")] = False,
    ray_retries: Annotated[int, typer.Option(
        "--ray-retries", min=0, help="Ray: times a run whose worker process or node died is "
                                     "started again (it resumes from its last checkpoint)")] = 3,
    max_runs: MaxRuns = MAX_RUNS,
) -> None:
    """Run every run of STUDY not yet completed in the store; resume interrupted ones."""
    from attndrift.config import ConfigError
    from attndrift.study.executor import execute
    from attndrift.study.spec import load_study
    from attndrift.study.store import Store

    if backend not in ("local", "ray"):
        fail(f"--backend {backend!r}: choose local or ray", 2)
    gpu_ids = _gpu_ids(gpus, backend, workers)
    from attndrift.runtime import torch_threads

    try:
        torch_threads(workers, threads)  # a bad count stops here, not in every worker
    except ValueError as e:
        fail(str(e), 2)
    try:
        spec, planned = load_study(study, max_runs)
    except ConfigError as e:
        fail(str(e), 2)
    if dry_run:
        for p in planned:
            out.print(p.run_id, highlight=False)
        return
    from attndrift.config import check_downloads

    store = Store(store_dir)
    try:  # the models and datasets of the runs still to do: in seconds, before any is claimed
        check_downloads([p.config for p in planned if store.state(p.run_id).status
                         != "completed"], str(study))
    except ConfigError as e:
        fail(str(e), 2)
    try:
        store.root.mkdir(parents=True, exist_ok=True)
        store.write_manifest(spec.name, planned)
    except OSError as e:
        fail(os_error_line(e), 1)
    total, counts = len(planned), _counts(store, planned, retry_failed)
    t0 = time.perf_counter()
    out.print(f"study [bold]{spec.name}[/]: {total} runs, {counts['completed']} already "
              f"completed -> {safe(store.root)}", highlight=False)
    report = _progress(counts, total, workers)
    resume = f"attndrift study run {study} --store {store_dir}"
    try:
        with sigterm_interrupts():
            outcomes = execute(store, planned, workers=workers, backend=backend,
                               retry_failed=retry_failed,
                               progress=sys.stderr.isatty() and workers == 1,
                               on_outcome=report, ray_address=ray_address,
                               gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
                               gpus=gpu_ids, threads=threads, ray_retries=ray_retries)
    except KeyboardInterrupt:
        fail(f"interrupted: unfinished runs are resumable; `{resume}` resumes them", 130)
    except OSError as e:
        fail(os_error_line(e), 1)
    _summarise(store, spec.name, outcomes, time.perf_counter() - t0, resume)


@app.command("status")
def status_cmd(
    store_dir: Annotated[Path, typer.Option("--store", help="run store directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show every run of the study in STORE with its status. Writes nothing (a read-only
    store is fine); a run or manifest it cannot read is reported as such."""
    from attndrift.study.store import Store, StoreError

    try:
        rows = status_rows(Store(store_dir))
    except StoreError as e:
        fail(str(e), 2)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if as_json:
        print(json.dumps({"counts": counts, "runs": rows}, indent=1))
        return
    table = Table(title=f"{store_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for col in ("run", "group", "status", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(safe(r[k] or "") for k in ("run_id", "group", "status", "error")))
    out.print(table)


@app.command("plan")
def plan_cmd(
    study: Annotated[Path, typer.Argument(help="study YAML (configs/studies/...)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    max_runs: MaxRuns = MAX_RUNS,
) -> None:
    """Print every run STUDY expands to, with the config keys that distinguish it."""
    from attndrift.config import ConfigError
    from attndrift.study.spec import distinguishing, load_study

    try:
        spec, planned = load_study(study, max_runs)
    except ConfigError as e:
        fail(str(e), 2)
    keys, values = distinguishing(planned)
    if as_json:
        print(json.dumps({"study": spec.name, "keys": keys, "runs": [
            {"run_id": p.run_id, "group": p.group, "values": v}
            for p, v in zip(planned, values, strict=True)]}, indent=1))
        return
    def shown(value: object) -> str:
        return safe(json.dumps(value) if isinstance(value, list) else str(value))

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(planned):
        groups.setdefault(p.group, []).append(i)
    out.print(f"study {spec.name}: {len(planned)} runs in {len(groups)} group(s)",
              highlight=False, soft_wrap=True)
    # Per group: what its runs share on one line; then, per block of runs that agree on the
    # keys that are not the group's axes (e.g. a dataset's budgets), those keys on one line
    # and a table of the axes. One table of every distinguishing key was too wide to read.
    for group, members in groups.items():
        varying = [k for k in keys if len({repr(values[i][k]) for i in members}) > 1]
        shared = [f"{k}={shown(values[members[0]][k])}" for k in keys if k not in varying]
        runs_word = "run" if len(members) == 1 else "runs"
        out.print(f"\n[bold]{safe(group)}[/] ({len(members)} {runs_word})"
                  + (": " + ", ".join(shared) if shared else ""), highlight=False,
                  soft_wrap=True)
        axes = [k for k in varying if any(k in planned[i].axes for i in members)]
        rest = [k for k in varying if k not in axes]
        blocks: dict[str, list[int]] = {}
        for i in members:
            blocks.setdefault(", ".join(f"{k}={shown(values[i][k])}" for k in rest), []).append(i)
        for head, runs in blocks.items():
            if head:
                out.print(f"  {head}", highlight=False, soft_wrap=True)
            table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 2))
            table.add_column("run", no_wrap=True,
                             min_width=max(len(planned[i].run_id) for i in runs))
            for col in axes:
                table.add_column(col)
            for i in runs:
                table.add_row(safe(planned[i].run_id), *(shown(values[i][k]) for k in axes))
            out.print(table)

