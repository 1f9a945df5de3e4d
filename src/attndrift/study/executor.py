"""Execute a study's runs into a store: in this process, a local process pool, or Ray tasks.

Every backend calls the same `execute_one`, which claims the run's lock without waiting, skips
it if another worker holds it or it is already done, cleans temp files a killed writer left,
and runs (or resumes) the training. Failures are recorded in the run's record and reported;
they never stop the other runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from filelock import Timeout

from attndrift.study.spec import PlannedRun
from attndrift.study.store import Store


@dataclass(frozen=True)
class Outcome:
    run_id: str
    status: str  # completed | diverged | failed | interrupted | skipped-busy | skipped-done
    seconds: float
    error: str | None = None


def execute_one(store_root: str, run_id: str, config: dict[str, Any], retry_failed: bool,
                progress: bool = False, threads: int | None = None) -> Outcome:
    """Claim, run (or resume) and record one run. Safe to call from any worker."""
    from attndrift.config import validate
    from attndrift.train import run

    store = Store(store_root)
    if not store.needs_run(run_id, retry_failed):
        return Outcome(run_id, "skipped-done", 0.0)
    lock = store.lock(run_id)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return Outcome(run_id, "skipped-busy", 0.0)
    t0 = time.perf_counter()
    try:
        if not store.needs_run(run_id, retry_failed):  # finished while we looked
            return Outcome(run_id, "skipped-done", 0.0)
        run_dir = store.run_dir(run_id)
        for tmp in run_dir.glob(".*.tmp"):  # left by a writer killed mid-write; we hold the lock
            tmp.unlink(missing_ok=True)
        import torch

        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            record = run(validate(config, run_id), run_dir, progress=progress)
        except Exception as err:  # recorded as failed by `run`; the study goes on
            return Outcome(run_id, "failed", time.perf_counter() - t0,
                           f"{type(err).__name__}: {err}")
        finally:  # in this process (--workers 1): leave the caller's setting as it was
            torch.set_num_threads(previous)
        return Outcome(run_id, record["status"], time.perf_counter() - t0, record.get("error"))
    finally:
        lock.release()


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` if set), for spreading
    local workers over them; empty without CUDA."""
    import torch

    count = torch.cuda.device_count()
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def _interrupt_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt  # the run records itself interrupted (resumable)

    signal.signal(signal.SIGTERM, handler)


def exit_with_parent(parent: int, poll_s: float = 0.5, grace_s: float = 20.0) -> None:
    """Watch (in a daemon thread) for process ``parent`` to die, e.g. kill -9 of `study run`;
    then stop this process: SIGTERM first (the run records itself interrupted and releases its
    lock), a hard exit ``grace_s`` later whatever the run is doing."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_init(parent: int, queue=None) -> None:
    """Pool worker initializer: SIGTERM interrupts the run, the worker exits when its parent
    dies, and with a ``queue`` it sees only the next GPU of that round robin. Runs before the
    worker touches CUDA, so ``cuda`` in the run's config means that GPU."""
    _interrupt_on_sigterm()
    exit_with_parent(parent)
    if queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = queue.get()


def _pool_task(*args) -> Outcome:
    """`execute_one` in a pool worker: a SIGTERM/SIGINT of the worker ends its run as
    ``interrupted`` (recorded, resumable) instead of raising in the parent."""
    try:
        return execute_one(*args)
    except KeyboardInterrupt:
        return Outcome(args[1], "interrupted", 0.0, "interrupted")


def _ray_task(*args, **kwargs) -> Outcome:  # module-level so Ray can ship it by reference
    """`execute_one` in a Ray worker. A cancel (the driver's Ctrl-C or SIGTERM) arrives as
    `KeyboardInterrupt`: the run records itself ``interrupted`` (resumable), as in a local
    pool worker, instead of staying ``running``."""
    try:
        return execute_one(*args, **kwargs)
    except KeyboardInterrupt:
        return Outcome(args[1], "interrupted", 0.0, "interrupted")


def execute(store: Store, planned: list[PlannedRun], *, workers: int = 1,
            backend: str = "local", retry_failed: bool = False, progress: bool = True,
            on_outcome: Callable[[Outcome], None] | None = None,
            ray_address: str | None = None, gpus_per_run: float = 0.0,
            cpus_per_run: float = 1.0, gpus: list[str] | None = None,
            threads: int | None = None, ray_retries: int = 3) -> list[Outcome]:
    """Run every planned run that still needs running; returns one `Outcome` per run.

    Each run uses `attndrift.runtime.torch_threads` torch threads: ``threads``,
    ``$ATTNDRIFT_THREADS`` or ``$OMP_NUM_THREADS`` when set, else ``cores // workers`` (Ray:
    ``cpus_per_run``).

    With the local backend and ``workers > 1``, worker ``i`` sees only GPU ``gpus[i % len]``
    (default: every visible GPU), so several workers share a GPU when there are more workers
    than GPUs. Ray places runs itself (``gpus_per_run``, fractions share a GPU) and starts a
    run again, up to ``ray_retries`` times, when its worker process or node dies (system
    failures only: a run that raises is recorded failed, not retried); the retry claims the
    run anew and resumes it from its last checkpoint."""
    todo = [p for p in planned if store.needs_run(p.run_id, retry_failed)]
    outcomes = [Outcome(p.run_id, "skipped-done", 0.0) for p in planned if p not in todo]
    report = on_outcome or (lambda _o: None)
    jobs = [(str(store.root), p.run_id, p.config.model_dump(mode="json"), retry_failed)
            for p in todo]
    from attndrift.runtime import torch_threads

    if backend == "ray":
        threads = torch_threads(1, threads) or max(1, int(cpus_per_run))
        outcomes += _execute_ray(jobs, report, ray_address, gpus_per_run, cpus_per_run,
                                 threads, ray_retries)
    elif workers <= 1:
        threads = torch_threads(1, threads)
        for job in jobs:
            outcome = execute_one(*job, progress=progress, threads=threads)
            report(outcome)
            outcomes.append(outcome)
    else:
        threads = torch_threads(workers, threads)
        import multiprocessing

        # spawn, not fork: forking a process that already holds torch threads can deadlock.
        ctx = multiprocessing.get_context("spawn")
        gpus = visible_gpus() if gpus is None else gpus
        queue = None
        if gpus:
            queue = ctx.Queue()
            for i in range(workers):
                queue.put(gpus[i % len(gpus)])
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                   initializer=_worker_init, initargs=(os.getpid(), queue))
        try:
            pending = {pool.submit(_pool_task, *job, False, threads) for job in jobs}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    outcome = fut.result()
                    report(outcome)
                    outcomes.append(outcome)
        except BaseException:
            # Ctrl-C or SIGTERM here: the workers record their runs interrupted and exit, instead
            # of the pool waiting for them to finish (ProcessPoolExecutor has no public handle
            # on its processes)
            import signal

            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return outcomes


def _execute_ray(jobs, report, address, gpus, cpus, threads, retries) -> list[Outcome]:
    try:
        import ray
    except ImportError:
        raise RuntimeError("backend=ray needs Ray: pip install ray (or pip install -e "
                           "'.[ray]' in the attndrift clone)") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=retries,
                      retry_exceptions=False)(_ray_task)
    refs = {task.remote(*job, False, threads): job[1] for job in jobs}
    outcomes = []
    try:
        while refs:  # a timeout, so Ctrl-C / SIGTERM reach this loop while runs are going
            done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            for ref in done:
                run_id = refs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # the worker died more often than `retries` allows
                    outcome = Outcome(run_id, "failed", 0.0,
                                      f"ray task failed: {str(err).splitlines()[0][:300]}")
                report(outcome)
                outcomes.append(outcome)
    except KeyboardInterrupt:
        _cancel_ray(ray, list(refs))
        raise
    return outcomes


def _cancel_ray(ray, refs: list, grace_s: float = 30.0) -> None:
    """Cancel running tasks the way Ctrl-C stops a local run: `KeyboardInterrupt` inside the
    task, so each run records itself ``interrupted`` and releases its claim; waits up to
    ``grace_s`` for them to finish writing."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=grace_s)
