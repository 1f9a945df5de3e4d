"""Measure a CLIP fine-tuned anywhere against its pretrained reference: one run record.

``measure`` runs the passes a training run runs before and after training, on the same fixed
probe subsets (the validation split carved from DATASET's training split, then the
class-balanced subsets, 002 §4.3): the attention probe (every metric per layer and head) of
the reference and of the fine-tuned model, the auxiliary metrics against the reference
(rollout, patch-to-patch, CKA, weight and embedding drift), zero-shot accuracy of both on
each transfer task (each through its own image encoder and its own text tower, 002 §4.4),
and task accuracy when the checkpoint has a classification head (attndrift runs). It writes
``OUT/record.json`` of the run schema with method ``external``, so ``report``, ``compare``
and the statistics read it like any run; several checkpoints of one reference measured into
one directory tree form a store.

A measurement is planned first (`plan_measurement`: settings, identity, output directory),
then run (`run_measurement`). Like ``run``, it never replaces what it did not write: the same
measurement already in OUT is returned as it is ("already measured"), and a directory holding
a training run, another measurement (unless ``force``) or other files is refused
(`existing_measurement`). The default OUT is ``runs/measured/<run id>``, derived from the
input, so two measurements never meet in one directory.

What a record cannot know about a foreign fine-tune is left out rather than guessed: there
is no training history, and ``train.lr`` is recorded only when given. ``external.recipe``
names the fine-tuning recipe: checkpoints of one recipe that differ only in ``seed`` are
replicates of one setting in the report's tables and statistics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attndrift.measure_phases import measure_phases
from attndrift.models.external import check_format, detect_format
from attndrift.pathsafe import check_name

OVERRIDABLE = ("data.", "probe.", "train.precision")
DEFAULT_ROOT = Path("runs/measured")
# files a measurement writes into OUT (and the lock it holds there)
OWN_FILES = {"record.json", "attention.safetensors", ".lock"}


class OutDirTaken(ValueError):
    """OUT holds something a measurement must not replace (one line, with the fix)."""


@dataclass
class Plan:
    """One measurement, decided before any model is loaded."""

    finetuned: str
    fmt: str
    reference: str
    data: Any
    probe: Any
    precision: str
    run_config: dict[str, Any] | None
    config: dict[str, Any]
    run_id: str
    out_dir: Path
    sha256: str | None
    open_clip_model: str | None = None
    progress: bool = False


def _check_overrides(overrides: list[str]) -> None:
    from attndrift.config import ConfigError

    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(OVERRIDABLE):
            raise ConfigError(
                f"override {item!r}: measure takes data.*, probe.* and train.precision overrides"
            )


def _is_tiny(reference: str | None) -> bool:
    from attndrift.models.clip import TINY_CLIP_DIR, TINY_NAMES

    if reference is None:
        return False
    return reference in TINY_NAMES or Path(reference).resolve() == TINY_CLIP_DIR.resolve()


def resolve_settings(
    finetuned: str,
    fmt: str = "auto",
    dataset: str | None = None,
    zeroshot: list[str] | None = None,
    overrides: list[str] | None = None,
    reference: str | None = None,
):
    """The ``(DataConfig, ProbeConfig, precision, run config or None)`` a measurement uses.

    A run directory starts from its own data, probe and precision settings (so its probe set
    is the run's); anything else from a run's defaults, except the zero-shot tasks: those
    default to the shapes world's only for the tiny CLIP reference, and must be given for
    any other. ``dataset``, ``zeroshot`` and ``overrides`` (``data.*``, ``probe.*``,
    ``train.precision``) apply on top.

    Raises:
        ConfigError: a bad override, no dataset or no zero-shot task for a checkpoint that
        is not a run.
    """
    from attndrift.config import ConfigError, apply_overrides, validate
    from attndrift.records import read_record

    overrides = list(overrides or [])
    _check_overrides(overrides)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    run_config = None
    base: dict[str, Any] = {}
    if fmt in ("run", "auto") and (Path(finetuned) / "record.json").is_file():
        run_config = read_record(Path(finetuned))["config"]
        base = {
            "data": dict(run_config.get("data") or {}),
            "probe": dict(run_config.get("probe") or {}),
            "train": {"precision": (run_config.get("train") or {}).get("precision", "auto")},
        }
    elif dataset is None and "data.dataset" not in given:
        raise ConfigError(
            "give --data DATASET (the dataset whose validation split holds the probe images)"
        )
    elif zeroshot is None and "data.zeroshot" not in given and not _is_tiny(reference):
        raise ConfigError(
            f"give --zeroshot TASK[,TASK...]: the transfer tasks to score {reference or 'it'} "
            "on (the default, shapes-zs-shape, is the tiny CLIP's toy world)"
        )
    if dataset is not None:
        base.setdefault("data", {})["dataset"] = dataset
    if zeroshot is not None:
        base.setdefault("data", {})["zeroshot"] = list(zeroshot)
    cfg = validate(apply_overrides(base, overrides), "measure settings")
    return cfg.data, cfg.probe, cfg.train.precision, run_config


def plan_measurement(
    finetuned: str,
    out_dir: str | Path | None = None,
    *,
    reference: str | None = None,
    dataset: str | None = None,
    zeroshot: list[str] | None = None,
    overrides: list[str] | None = None,
    fmt: str = "auto",
    open_clip_model: str | None = None,
    name: str | None = None,
    recipe: str | None = None,
    seed: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    progress: bool = False,
) -> Plan:
    """Settings, identity and output directory of a measurement (see `measure`); reads no
    model. The run id hashes the settings and the checkpoint's bytes, not the device."""
    from attndrift.config import ConfigError
    from attndrift.models.weights import checkpoint_sha256
    from attndrift.records import read_record, run_id_for

    check_format(fmt)
    fmt = detect_format(finetuned) if fmt == "auto" else fmt
    run_config = read_record(Path(finetuned))["config"] if fmt == "run" else None
    if reference is None:
        if run_config is None:
            raise ConfigError("give --reference PRETRAINED (the model that was fine-tuned)")
        reference = str(run_config.get("model", "tiny"))
    data, probe, precision, run_config = resolve_settings(
        finetuned, fmt, dataset, zeroshot, overrides, reference
    )
    if run_config is not None:  # a run knows its learning rate and seed
        lr = (run_config.get("train") or {}).get("lr") if lr is None else lr
        seed = run_config.get("seed") if seed is None else seed
    if name is not None:
        check_name(name)  # a name is one directory name, as a run config's (`pathsafe`)
    label = name or (run_config or {}).get("name") or Path(finetuned.rstrip("/")).name
    config = {
        "name": label,
        "seed": 0 if seed is None else seed,
        "model": reference,
        "method": "external",
        "external": {"format": fmt, "recipe": recipe or label},
        "data": data.model_dump(mode="json"),
        "probe": probe.model_dump(mode="json"),
        "train": {"precision": precision, **({"lr": lr} if lr is not None else {})},
        "device": device,
    }
    sha = checkpoint_sha256(finetuned)
    identity = {k: v for k, v in config.items() if k != "device"}
    run_id = run_id_for({**identity, "finetuned_sha256": sha})
    out = Path(out_dir) if out_dir is not None else DEFAULT_ROOT / run_id
    return Plan(finetuned, fmt, reference, data, probe, precision, run_config, config, run_id,
                out, sha, open_clip_model, progress)


def existing_measurement(plan: Plan, force: bool = False) -> dict[str, Any] | None:
    """The completed record of this very measurement in ``plan.out_dir`` (nothing to do), or
    None when OUT is free: new, empty, or holding only an unfinished measurement's files.

    Raises:
        OutDirTaken: OUT is FINETUNED itself, holds a training run (never replaced), another
        completed measurement (unless ``force``), or files a measurement did not write.
    """
    from attndrift.records import RecordError, read_record

    out = plan.out_dir
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutDirTaken(f"--out {out} is a file; choose a directory")
    try:
        record = read_record(out)
    except RecordError:
        record = None
    if record is not None and record["config"].get("method") != "external":
        raise OutDirTaken(
            f"--out {out} holds the attndrift training run {record['run_id']} "
            f"({record['status']}); measure never replaces a run: choose another --out"
        )
    if Path(plan.finetuned).exists() and out.resolve() == Path(plan.finetuned).resolve():
        raise OutDirTaken(f"--out {out} is FINETUNED itself; choose another --out")
    if record is not None and record["status"] == "completed":
        if record["run_id"] == plan.run_id:
            return record
        if not force:
            raise OutDirTaken(
                f"--out {out} holds another measurement, {record['run_id']} (this one is "
                f"{plan.run_id}); choose another --out, or pass --force to replace it"
            )
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in OWN_FILES and not p.name.startswith(".record.json."))
    if others and record is None:
        raise OutDirTaken(
            f"--out {out} holds files a measurement did not write (e.g. {others[0]}); "
            "choose a new or empty directory"
        )
    return None


def run_measurement(plan: Plan, device: str = "auto") -> dict[str, Any]:
    """Measure ``plan`` and write ``OUT/record.json`` and ``OUT/attention.safetensors`` under
    OUT's lock (a second process measuring into OUT is refused, `OutDirTaken`)."""
    from filelock import FileLock, Timeout

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(plan.out_dir / ".lock", thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutDirTaken(f"another process is measuring into {plan.out_dir}") from None
    with contextlib.ExitStack() as stack:
        stack.callback(lock.release)
        return measure_phases(plan, device)


def measure(
    finetuned: str,
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    device: str = "auto",
    **settings: Any,
) -> dict[str, Any]:
    """Measure ``finetuned`` against ``reference`` and write ``out_dir/record.json``
    (default ``runs/measured/<run id>``); returns the record. The same measurement already in
    ``out_dir`` is returned as it is, nothing rewritten.

    ``settings`` are `plan_measurement`'s: ``reference`` defaults to a run directory's own
    model (and is required otherwise), ``dataset`` and ``zeroshot`` likewise (``zeroshot``
    defaults to the shapes task only for the tiny CLIP), and ``seed`` and ``lr`` (the
    fine-tuning's, for grouping replicates and learning-rate tables) to a run's own (else 0
    and unrecorded); ``fmt`` is ``auto`` or one of `attndrift.models.external.FORMATS`.

    Raises:
        ConfigError: bad settings; FileNotFoundError: missing file; ExternalModelError /
        ArchitectureMismatch: unknown format, unreadable, incomplete or mismatching
        checkpoint; OutDirTaken: OUT holds something else.
    """
    plan = plan_measurement(finetuned, out_dir, device=device, **settings)
    done = existing_measurement(plan, force)
    return done if done is not None else run_measurement(plan, device)
