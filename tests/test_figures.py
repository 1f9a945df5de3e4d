"""The report's figures on a real-shaped store (12 layers x 12 heads, two backbones, two
datasets, LoRA r=4/8/16, a weight-decay variant, APR, 3 seeds, a record without head diversity
and loss history): no series mixes settings, every method is in the overlay, no text overlaps
another, legends stay off the data, and drawing writes no warning (issues 12 and 17)."""

import contextlib
import csv
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from attndrift.analysis import load_store
from attndrift.analysis.runs import setting_key
from attndrift.report import FIGURES, build_report, figures, overlay, style, summary
from attndrift.report.figures import NoData
from realshaped import write_store

PANEL_RUNS = ("openai/clip-vit-base-patch32", "eurosat")


def _fake_attention(run_dir: Path, seed: int, patches: int = 49, layers: int = 12) -> None:
    """Saved maps as `attndrift run` writes them: the same 8 probe images for every run of a
    dataset, maps [8, L, heads, N] before and after."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 3, 56, 56), dtype=np.uint8)
    pre = rng.dirichlet(np.ones(patches), size=(8, layers, 4)).astype(np.float32)
    peak = np.eye(patches, dtype=np.float32)[seed % patches]
    fin = (0.7 * pre + 0.3 * peak).astype(np.float32)
    save_file(
        {"images": images, "pretrained": pre, "final": fin, "labels": np.arange(8, dtype=np.int64)},
        str(run_dir / overlay.ATTENTION_FILE),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("realshaped")
    truth = write_store(root)
    for k, r in enumerate(load_store(root)):
        if r.ok and (r.config.get("model"), r.config["data"]["dataset"]) == PANEL_RUNS:
            _fake_attention(r.path, k)
    return root, truth


@pytest.fixture(scope="module")
def runs(store):
    return load_store(store[0])


@pytest.fixture(scope="module")
def drawn(runs) -> dict[str, Figure]:
    """Every figure of the fixture, drawn with warnings as errors (so none reaches stderr)."""
    out = {}
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for spec in FIGURES:
            with contextlib.suppress(NoData):
                out[spec.name] = spec.draw(runs)
    return out


def test_every_figure_of_003_that_the_store_supports_is_drawn(drawn):
    expected = {
        "dashboard",
        "baseline_structure",
        "layer_delta_heatmaps",
        "lr_panels",
        "accuracy_entropy",
        "trajectories",
        "layer_time_heatmap",
        "gini_evolution",
        "erf_evolution",
        "regularization",
        "statistical_summary",
        "structure_vs_zeroshot",
        "zeroshot_per_model",
        "training_dynamics",
        "metric_correlations",
        "convergence",
        "attention_overlay",
        "forgetting",
    }
    assert expected <= set(drawn)
    # this store has no freezing and a single LoRA target set: those say why instead
    assert not {"frozen_layers", "lora_targets"} & set(drawn)


def test_no_series_mixes_settings(runs, store):
    """Each series (panel × family × lr) holds the seeds of exactly one designed setting: the
    fixture's own ground truth (spec names), not attndrift's grouping, is the judge."""
    _, truth = store
    spec_of = {Path(d).name: name for d, name in truth.items()}
    series = style.setting_series([r for r in runs if r.ok], runs)
    n = 0
    for panel, settings in series.items():
        for fam, lr, group in settings:
            specs = {spec_of.get(r.path.name, r.path.name) for r in group}
            assert len(specs) == 1, (panel, fam.label, lr, specs)
            assert len({setting_key(r.config) for r in group}) == 1
            assert {style.panel_of(r) for r in group} == {panel}
            n += 1
    designed = {truth[r.path.name] for r in runs if r.ok}
    assert n == len(designed)  # every setting is one series, none split, none merged


def test_series_labels_name_what_differs(runs):
    labels = style.family_labels(runs)
    assert len(set(labels.values())) == len(labels)  # no two families read the same
    text = " | ".join(labels.values())
    for part in ("LoRA r=4", "LoRA r=16", "wd 0.1", "APR"):
        assert part in text, text
    assert not any("ViT" in lab or "eurosat" in lab for lab in labels.values())  # axes


def _legend_labels(fig: Figure) -> list[str]:
    out = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    out += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return out


def test_figure_legends_name_one_setting_per_entry(drawn, runs):
    """Legend entries of the lr and time figures are family labels (+ lr), each naming one
    family: never a bare method that would pool LoRA ranks or weight decays."""
    fams = set(style.family_labels(runs).values())
    for name in ("lr_panels", "trajectories", "convergence", "training_dynamics"):
        entries = [
            e
            for e in _legend_labels(drawn[name])
            if e not in ("pretrained", "collapse onset", "−1% threshold", "not completed")
            and not e.startswith("not converged")
        ]
        assert entries, name
        for e in entries:
            base = e.split(" · lr ")[0]
            assert base in fams, (name, e)


def test_one_colour_per_family_in_every_figure(drawn, runs):
    """A family's line has the same colour (up to the lr shade) wherever it is drawn, and a
    method keeps its hue."""
    pal = style.Palette(runs)
    fams = style.family_labels(runs)
    for lab in fams.values():
        lines = [ln for ln in drawn["lr_panels"].axes[0].get_lines() if ln.get_label() == lab]
        for ln in lines:
            assert ln.get_color() == pal.color(lab)
    full = [lab for lab in fams.values() if lab.startswith("full FT")]
    lora = [lab for lab in fams.values() if lab.startswith("LoRA")]
    red = [np.array(__import__("matplotlib.colors").colors.to_rgb(pal.color(x))) for x in full]
    blue = [np.array(__import__("matplotlib.colors").colors.to_rgb(pal.color(x))) for x in lora]
    assert all(c[0] > c[2] for c in red) and all(c[2] > c[0] for c in blue)


def test_overlay_covers_every_method_and_lr_extremes(runs):
    chosen = overlay.overlay_runs(runs)
    methods = {
        r.config["method"]
        for r in runs
        if r.ok and (r.config["model"], r.config["data"]["dataset"]) == PANEL_RUNS
    }
    assert {r.config["method"] for r, _ in chosen} == methods
    lrs = {
        r.config["train"]["lr"]
        for r in runs
        if r.ok
        and r.config["method"] == "full_ft"
        and (r.config["model"], r.config["data"]["dataset"]) == PANEL_RUNS
        and r.config["train"]["weight_decay"] == 0.01
        and (r.config.get("regularizer") or {}).get("name", "none") == "none"
    }
    picked = {r.config["train"]["lr"] for r, lab in chosen if lab.startswith("full FT · lr")}
    assert {min(lrs), max(lrs)} <= picked


def test_overlay_is_pixel_exact_with_a_colour_bar(drawn):
    fig = drawn["attention_overlay"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("LoRA" in t for t in titles) and any("full FT" in t for t in titles)
    maps = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert maps
    for im in maps:
        assert im.get_interpolation() == "nearest"
        h, w = im.axes.get_images()[0].get_array().shape[:2]
        assert tuple(im.get_extent()) == (-0.5, w - 0.5, h - 0.5, -0.5)
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def _texts(fig: Figure) -> list[Text]:
    """Every text the renderer draws: titles, axis labels, the tick labels inside the view
    limits, annotations, legends, figure texts."""
    out = [fig._suptitle] if fig._suptitle is not None else []
    out += list(fig.texts)
    for leg in fig.legends:
        out += [*leg.get_texts(), leg.get_title()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += [
            ax.title,
            ax._left_title,
            ax._right_title,
            ax.xaxis.label,
            ax.yaxis.label,
            *ax.texts,
        ]
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            for tick in axis.get_major_ticks():
                if lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo):
                    out += [t for t in (tick.label1, tick.label2) if t.get_visible()]
        if ax.get_legend():
            out += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    unique = {id(t): t for t in out}  # the suptitle is also one of fig.texts
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def _rendered(fig: Figure):
    """The figure drawn once by Agg at the report's 100 dpi; its renderer."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
        fig.set_dpi(100)
        fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect by more than a pixel each way (Agg at the
    report's 100 dpi)."""
    renderer = _rendered(fig)
    texts = _texts(fig)
    boxes = np.array([t.get_window_extent(renderer).extents for t in texts]).reshape(-1, 4)
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    w = np.minimum(x1[:, None], x1[None, :]) - np.maximum(x0[:, None], x0[None, :])
    h = np.minimum(y1[:, None], y1[None, :]) - np.maximum(y0[:, None], y0[None, :])
    i, j = np.nonzero(np.triu((w > 1.0) & (h > 1.0), k=1))
    bad = [(texts[a].get_text(), texts[b].get_text()) for a, b in zip(i, j, strict=True)]
    return bad


def _clipped(fig: Figure) -> list[str]:
    """Drawn texts that reach past the figure's edge (cut off in the PNG)."""
    renderer = _rendered(fig)
    w, h = fig.canvas.get_width_height()
    out = []
    for t in _texts(fig):
        b = t.get_window_extent(renderer)
        if b.x0 < -1 or b.y0 < -1 or b.x1 > w + 1 or b.y1 > h + 1:
            out.append(t.get_text())
    return out


def test_no_text_overlaps_or_is_cut_off_in_any_figure(drawn):
    problems = {name: _overlaps(fig)[:5] + _clipped(fig)[:5] for name, fig in drawn.items()}
    assert not {k: v for k, v in problems.items() if v}


def _data_points(ax) -> np.ndarray:
    pts = [
        ln.get_transform().transform(ln.get_xydata())
        for ln in ax.get_lines()
        if len(ln.get_xydata())
    ]
    pts += [
        c.get_offset_transform().transform(c.get_offsets())
        for c in ax.collections
        if len(c.get_offsets())
    ]
    return np.concatenate(pts) if pts else np.empty((0, 2))


def test_legends_stay_off_the_data(drawn):
    """A figure legend lies outside every axes; an axes legend covers none of its points."""
    for name, fig in drawn.items():
        r = _rendered(fig)
        for leg in fig.legends:
            lb = leg.get_window_extent(r)
            for ax in fig.axes:
                if ax.get_visible() and ax.get_label() != "<colorbar>":
                    assert not lb.overlaps(ax.get_window_extent(r).shrunk(0.99, 0.99)), name
        for ax in fig.axes:
            if ax.get_legend():
                lb = ax.get_legend().get_window_extent(r)
                pts = _data_points(ax)
                inside = [p for p in pts if lb.contains(*p) and np.all(np.isfinite(p))]
                assert not inside, name


def test_error_bars_stay_in_range(drawn):
    """No error bar of an accuracy panel goes above 100% or below 0."""
    for ax in drawn["lr_panels"].axes:
        if "acc" in ax.get_title() or "zero-shot" in ax.get_title():
            for coll in ax.collections:
                for seg in coll.get_segments():
                    ys = np.asarray(seg)[:, 1]
                    assert np.all(ys <= 100 + 1e-9) and np.all(ys >= -1e-9), ax.get_title()


def test_epoch_ticks_are_integers(drawn):
    for ax in drawn["convergence"].axes:
        if ax.get_xlabel() == "epoch":
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("n_layers", [12, 24])
def test_heatmap_annotations_fit_at_12_and_24_layers(n_layers):
    """A 24-layer (ViT-L/14) heatmap: annotations shrink or go, they never overlap."""
    from test_tables import fake_record
    from test_tables import write_store as write_small

    with tempfile.TemporaryDirectory() as tmp:
        recs = {
            f"{m}_{lr:g}_{s}": fake_record(
                name=f"{m}_{lr:g}",
                method=m,
                lr=lr,
                seed=s,
                n_layers=n_layers,
                drift=-20.0 * (k + 1),
            )
            for m in ("full_ft", "lora")
            for k, lr in enumerate((1e-5, 1e-4, 1e-3))
            for s in range(2)
        }
        runs = load_store(write_small(Path(tmp), recs))
        fig = figures.layer_delta_heatmaps(runs)
        assert not _overlaps(fig)
        sizes = [t.get_fontsize() for ax in fig.axes for t in ax.texts]
        assert all(s >= 6 for s in sizes)


def test_report_of_the_fixture_writes_nothing_to_stderr(store, tmp_path, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = build_report(store[0], tmp_path)
    err = capfd.readouterr().err
    assert err == ""
    html = result.html.read_text()
    assert "not shown" in html.lower() and "froze layers" in html
    assert "No artists" not in html and "Mean of empty slice" not in html
    assert not math.isnan(result.seconds)


def test_regularization_pairs_each_variant_with_its_unregularized_setting(drawn):
    """APR (one lr) and the weight-decay variant (another lr) each stand next to the full FT
    setting of the same backbone, dataset and lr, even though no lr has all three."""
    rows = [t.get_text() for t in drawn["regularization"].axes[0].get_yticklabels()]
    apr = [i for i, r in enumerate(rows) if "APR" in r]
    assert apr and all("lr 0.0001" in rows[i] and "ViT-B/32 · eurosat" in rows[i] for i in apr)
    assert "ViT-B/32 · eurosat · full FT · lr 0.0001  (n=3)" in rows
    assert sum("wd 0.1" in r for r in rows) == 4  # every backbone × dataset


def test_convergence_rings_the_runs_that_did_not_converge(drawn, runs):
    from attndrift.analysis import converged

    fig = drawn["convergence"]
    assert "not converged (late val acc sd ≥ 0.005)" in _legend_labels(fig)
    rings = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_markerfacecolor() == "none"]
    assert len(rings) == sum(converged(r) is False for r in runs if r.record)


def test_report_of_records_without_a_metric_is_quiet(tmp_path, capfd):
    """Issue 24 item 18: records with no head diversity at all (the study's released records)
    make statistics with no values: n/a, and not one warning on stderr."""
    store = tmp_path / "store"
    write_store(store, drop=("head_diversity",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build_report(store, tmp_path / "report")
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
    with open(tmp_path / "report" / "tables" / "matched_lr.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["d_head_diversity"] == "" for r in rows)  # n/a, not a number
    assert result.html.exists()


def test_lora_targets_compares_target_sets_within_one_method(runs):
    """Every method on LoRA's target modules gets the target-set comparison (DoRA too), and a
    DoRA setting is never set against a LoRA one: the fixture's LoRA r=8 runs, copied once as
    DoRA on q,v and once as DoRA on q,k,v,o, give DoRA's pair and nothing of LoRA's."""
    import copy
    import dataclasses

    def as_dora(r, targets):
        rec = copy.deepcopy(r.record)
        rec["config"]["method"] = "dora"
        rec["config"]["lora"]["targets"] = targets
        return dataclasses.replace(r, path=r.path.with_name(r.path.name + "-".join(targets)),
                                   record=rec)

    lora8 = [r for r in runs if r.ok and r.config.get("method") == "lora"
             and r.config["lora"]["r"] == 8 and r.config["model"].endswith("patch32")]
    assert lora8
    extra = [as_dora(r, t) for r in lora8 for t in (["q_proj", "v_proj"],
                                                  ["k_proj", "o_proj", "q_proj", "v_proj"])]
    fig = summary.lora_targets([*runs, *extra])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert labels and all("DoRA" in lab for lab in labels), labels
    assert len({lab.split(" (n=")[0] for lab in labels}) == len(labels)
    with pytest.raises(NoData):  # LoRA alone has one target set in this store
        summary.lora_targets(runs)
