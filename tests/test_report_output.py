"""The report as a whole: written atomically (issue 24 item 13) and safe in Markdown (item 15)."""

import errno
import os
import pathlib
import re

import pytest
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.report import build_report
from test_tables import fake_record, matched_store, write_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> pathlib.Path:
    return matched_store(tmp_path_factory.mktemp("store"), seeds=2)


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("victim", "error"), [
    ("dashboard.png", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    ("report.html", KeyboardInterrupt()),
])
def test_a_failed_write_leaves_the_previous_report_intact(store, tmp_path, monkeypatch, victim,
                                                          error):
    out = tmp_path / "report"
    build_report(store, out)
    (out / "notes.txt").write_text("mine")  # not the report's: never touched
    before = _snapshot(out)
    real_bytes, real_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def failing(real):
        def write(self, data, *args, **kwargs):
            if self.name == victim:
                real(self, data[: len(data) // 2])  # a truncated file, as on a full disk
                raise error
            return real(self, data, *args, **kwargs)
        return write

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing(real_bytes))
    monkeypatch.setattr(pathlib.Path, "write_text", failing(real_text))
    with pytest.raises(type(error)) as info:
        build_report(store, out)
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging left behind
    if isinstance(error, OSError):
        assert info.value.filename == str(out / "figures" / victim)
        assert info.value.errno == errno.ENOSPC


def test_a_new_report_replaces_the_old_tables_and_figures(store, tmp_path):
    out = tmp_path / "report"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "stale.csv").write_text("old")
    build_report(store, out)
    assert not (out / "tables" / "stale.csv").exists()  # no old CSV next to a new report
    assert (out / "tables" / "runs.csv").exists() and (out / "report.html").exists()


def test_full_disk_in_report_is_one_line_naming_the_file(store, tmp_path, monkeypatch):
    out = tmp_path / "report"
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.suffix == ".png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    result = runner.invoke(app, ["report", str(store), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and f"cannot write {out / 'figures'}" in lines[0]
    assert "No space left on device" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_markdown_summary_escapes_task_names(tmp_path):
    """Issue 24 item 15: a transfer task named with ``|`` or HTML cannot break the table."""
    records = {}
    for seed in (0, 1):
        rec = fake_record(name="ft", seed=seed)
        rec["zeroshot"] = {"a|b<i>x</i>": rec["zeroshot"]["shapes-zs-shape"]}
        records[f"ft_{seed}"] = rec
    store = write_store(tmp_path / "store", records)
    result = build_report(store, tmp_path / "report")
    md = result.markdown.read_text()
    assert "<i>" not in md
    header = next(line for line in md.splitlines() if "a\\|b" in line and "retained" in line)
    body = md.splitlines()[md.splitlines().index(header) + 2]
    unescaped = header.replace("\\|", "")
    assert unescaped.count("|") == body.replace("\\|", "").count("|")


def _measured(tmp_path, towers=("reference", "fine-tuned")):
    """Records as `attndrift measure` writes them: method external, a recipe, no lr."""
    recs = {}
    for recipe, zs_after, tower in zip(("untouched_cls", "lora_cls"), (0.8, 0.6), towers,
                                       strict=True):
        for seed in (0, 1):
            rec = fake_record(name=recipe, seed=seed, zs_after=zs_after)
            cfg = rec["config"]
            rec["config"] = {"name": recipe, "seed": seed, "model": "tiny", "method": "external",
                             "external": {"format": "hf", "recipe": recipe},
                             "data": cfg["data"], "probe": cfg["probe"],
                             "train": {"precision": "auto"}, "device": "cpu"}
            rec["provenance"]["finetuned"] = {"format": "hf", "text_tower": tower}
            rec["history"] = {"probes": [], "epochs": [], "loss": []}
            recs[f"{recipe}_{seed}"] = rec
    return write_store(tmp_path / "measured", recs)


def test_measured_records_read_as_what_they_are(tmp_path):
    """Issue 22 item 6: a measured record's setting is its recipe; no blank labels, no
    'external.recipe', no 'best lr nan'; a fine-tuned text tower is said where zero-shot is."""
    from attndrift.analysis import all_tables, load_store
    from attndrift.analysis.table import display
    from attndrift.report.render import glance

    runs = load_store(_measured(tmp_path))
    rows = glance(runs)["rows"]
    assert sorted(r[1] for r in rows) == ["measured lora_cls", "measured untouched_cls"]
    assert {r[2] for r in rows} == {"—"}  # no learning rate recorded: not "nan"
    tables = {t.name: t for t in all_tables(runs)}
    (verdict,) = tables["verdict"].rows
    assert verdict["keeps"] == "measured untouched_cls" and verdict["vs"] == "measured lora_cls"
    for t in tables.values():
        for row in display(t)[1]:
            assert not any("external.recipe" in c or c == "nan" for c in row), t.name
    assert {r["method"] for r in tables["matched_lr"].rows} == {"measured untouched_cls",
                                                                "measured lora_cls"}
    zs = {r["run"]: r["text_tower"] for r in tables["zeroshot"].rows}
    assert zs == {"untouched_cls": "pretrained", "lora_cls": "fine-tuned"}


def test_compare_names_the_text_tower_zero_shot_used(tmp_path):
    from rich.console import Console

    from attndrift.compare import comparison_tables
    from attndrift.records import read_record

    store = _measured(tmp_path)
    records = [read_record(store / d) for d in ("untouched_cls_0", "lora_cls_0")]
    console = Console(width=200, record=True)
    console.print(comparison_tables(records, ["untouched", "lora"])[1])
    text = console.export_text()
    assert "frozen text tower" not in text and "text tower: per run" in text
    assert re.search(r"lora\s+│\s+fine-tuned", text) and re.search(r"untouched\s+│\s+pretrained",
                                                                     text)
    plain = [read_record(store / "untouched_cls_0")]
    plain[0]["provenance"]["finetuned"]["text_tower"] = "reference"
    console = Console(width=200, record=True)
    console.print(comparison_tables(plain, ["untouched"])[1])
    assert "pretrained, frozen" in console.export_text()


def test_interrupted_report_command_keeps_the_old_report(store, tmp_path, monkeypatch):
    """SIGTERM (raised as KeyboardInterrupt by the CLI) or Ctrl-C while drawing: one line,
    exit 130, the previous report whole and no staging directory left."""
    import attndrift.report.build as build

    out = tmp_path / "report"
    build_report(store, out)
    before = _snapshot(out)

    def interrupted(runs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "draw_figures", interrupted)
    result = runner.invoke(app, ["report", str(store), "--out", str(out)])
    assert result.exit_code == 130
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "keeps the report" in lines[0]
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
