"""The report's answer first (issue 22 item 4): the verdict per backbone × dataset against an
independent scipy computation, its caveats, and the first screen's order; registering a table,
a figure or a summary line puts it in the report with no other change (issue 20 item 5)."""

import math
import re

import pytest
import scipy.stats

from attndrift.analysis import load_store, table
from attndrift.analysis.verdict import verdict, verdict_lines
from attndrift.report import base, build_report
from test_tables import fake_record, write_store

RET = {("full_ft", 0): 0.30, ("full_ft", 1): 0.36, ("full_ft", 2): 0.33,  # zs after (before 0.8)
       ("lora", 0): 0.70, ("lora", 1): 0.74, ("lora", 2): 0.66}


def _records(unconverged: bool = False) -> dict[str, dict]:
    recs = {}
    for method in ("full_ft", "lora"):
        for lr, acc in ((1e-4, 0.80), (1e-3, 0.90)):  # 1e-3 is the best lr by val accuracy
            for s in range(3):
                zs_after = RET[method, s] if lr == 1e-3 else 0.79
                rec = fake_record(name=f"{method}_{lr:g}", method=method, lr=lr, seed=s,
                                  acc=acc + 0.01 * s, zs_after=zs_after)
                if unconverged and method == "lora" and lr == 1e-3 and s < 2:
                    rec["history"]["epochs"] = [{"epoch": e, "step": 10 * e, "val_acc": v}
                                                for e, v in ((1, 0.5), (2, 0.7), (3, 0.9))]
                recs[f"{method}_{lr:g}_{s}"] = rec
    return recs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return load_store(write_store(tmp_path_factory.mktemp("v"), _records(unconverged=True)))


def test_verdict_names_the_family_and_the_welch_test(runs):
    (row,) = verdict(runs).rows
    lora = [100 * RET["lora", s] / 0.8 for s in range(3)]
    ft = [100 * RET["full_ft", s] / 0.8 for s in range(3)]
    want = scipy.stats.ttest_ind(lora, ft, equal_var=False)
    assert row["keeps"].startswith("LoRA") and row["lr"] == 1e-3  # best lr by val accuracy
    assert row["retained"] == pytest.approx(sum(lora) / 3, rel=1e-12)
    assert row["gap"] == pytest.approx(sum(lora) / 3 - sum(ft) / 3, rel=1e-12)
    assert row["p"] == pytest.approx(want.pvalue, rel=1e-9) and row["seeds"] == "3 vs 3"
    assert row["test_acc"] == pytest.approx((0.89 + 0.90 + 0.91) / 3, rel=1e-9)
    assert "full FT" in row["vs"] and "lr 1e-3" in row["vs"]
    assert "2 of 3 seeds not converged" in row["caveats"]


def test_verdict_sentence_carries_the_statistic_and_caveat(runs):
    (line,) = verdict_lines(runs)
    assert re.search(r"LoRA.* at lr 1e-3 keeps the most zero-shot transfer, 87\.5% ± 5\.0 "
                     r"retained at 90\.0% test accuracy", line), line
    assert "Welch p = 0.000" in line and "3 vs 3 seeds" in line
    assert "Caveat: 2 of 3 seeds not converged" in line


def test_one_seed_and_no_zero_shot_are_said(tmp_path):
    recs = {k: v for k, v in _records().items() if k.endswith("_0")}
    (row,) = verdict(load_store(write_store(tmp_path / "a", recs))).rows
    assert math.isnan(row["p"]) and "fewer than 2 seeds: no test" in row["caveats"]
    for rec in recs.values():
        rec["zeroshot"] = {}
    empty = load_store(write_store(tmp_path / "b", recs))
    assert verdict(empty).empty and verdict_lines(empty) == [
        "No verdict: no completed run evaluated zero-shot transfer."]


def test_first_screen_is_the_answer_then_the_dashboard(runs, tmp_path):
    html = build_report(runs[0].path.parent, tmp_path / "r").html.read_text()
    order = [html.index(x) for x in ('id="slot-verdict"', 'id="slot-early_warning"',
                                     'id="figure-dashboard"', 'id="figure-accuracy_retention"',
                                     'id="results"', 'id="statistics"', 'id="contents"')]
    assert order == sorted(order)
    assert "<h3>Which signal warned early</h3>" in html  # the slot the predictor analysis fills
    assert '<details class="section" id="statistics">' in html  # details fold below
    # every table scrolls inside its box, its first (naming) column fixed
    assert html.count("<table") == html.count('<div class="scroll"><table')
    assert ".scroll th:first-child, .scroll td:first-child { position: sticky; left: 0;" in html


def test_registering_a_table_figure_and_summary_line_is_all_it_takes(runs, tmp_path,
                                                                      monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.setattr(table, "_TABLES", dict(table._TABLES))
    monkeypatch.setattr(table, "_SUMMARIES", dict(table._SUMMARIES))
    monkeypatch.setattr(base, "_FIGURES", dict(base._FIGURES))

    @table.register_table("zz_extra", "forgetting", order=99)
    def extra(runs, drift="subset_mean"):
        return table.make_table("zz_extra", "Extra table", "cap", [table.Column("x", "x")],
                                [{"x": "hello-table"}], "none")

    @base.register_figure("zz_fig", "Extra figure", caption="fig caption", section="forgetting",
                          order=99, tables=("zz_extra",))
    def fig(runs):
        f = Figure(figsize=(2, 1))
        f.subplots().plot([0, 1])
        return f

    @table.register_summary("early_warning")
    def warned(runs, drift="subset_mean"):
        return ["entropy warned first"]

    result = build_report(runs[0].path.parent, tmp_path / "r")
    html = result.html.read_text()
    forgetting = html[html.index('id="forgetting"'):html.index('id="runs"')]
    assert "hello-table" in forgetting and 'id="figure-zz_fig"' in forgetting
    assert 'href="#table-zz_extra"' in forgetting  # the caption links the table it names
    early = html[html.index('id="slot-early_warning"'):html.index('id="figure-dashboard"')]
    assert "entropy warned first" in early and "not computed" not in early
    assert (tmp_path / "r" / "tables" / "zz_extra.csv").exists()
    assert "entropy warned first" in result.markdown.read_text()


def test_at_a_glance_counts_the_seeds_that_did_not_converge(runs):
    from attndrift.report.render import glance

    g = glance(runs)
    col = g["headers"].index("not converged")
    flags = {row[1]: row[col] for row in g["rows"]}
    assert flags == {"full FT": "—", "LoRA r=8": "2"}  # 2 epochs cannot be checked: "—"
    assert "not converged" in g["caption"]


def test_an_empty_slot_shows_its_placeholder_and_a_failing_one_says_so(runs, monkeypatch):
    from attndrift.report.layout import summary_slots

    monkeypatch.setattr(table, "_SUMMARIES", {})
    table.register_summary("verdict")(lambda runs, drift: 1 / 0)
    slots = {s["id"]: s for s in summary_slots(runs)}
    assert slots["early_warning"]["lines"] == []
    assert slots["early_warning"]["placeholder"].startswith("not computed")
    assert slots["verdict"]["lines"] == ["error while computing: ZeroDivisionError: division by "
                                         "zero"]
