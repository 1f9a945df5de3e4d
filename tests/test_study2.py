"""configs/studies/study2.yaml: the later protocol's 84 runs, as later_protocol.md lists them."""

from conftest import ROOT


def test_study2_plans_the_later_protocols_84_runs():
    import json
    from collections import Counter

    from typer.testing import CliRunner

    from attndrift.cli import app
    from attndrift.study.spec import load_study

    path = ROOT / "configs" / "studies" / "study2.yaml"
    result = CliRunner().invoke(app, ["study", "plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    _, planned = load_study(path)
    assert [r["run_id"] for r in json.loads(result.output)["runs"]] == [p.run_id for p in planned]
    cells = Counter()
    for p in planned:
        c = p.config
        assert (c.train.epochs, c.train.batch_size, c.train.precision, c.train.weight_decay,
                c.eval.checkpoint, c.seed) in {(6, 32, "fp32", 0.01, "best", s)
                                                for s in (7, 11, 19)}
        assert c.data.zeroshot == ["cifar100", "cifar10"]
        assert c.data.zeroshot_eval["cifar10"].images == 2000
        assert c.data.zeroshot_eval["cifar100"].templates == "later"
        b = c.data.budget
        if c.data.dataset == "eurosat":
            assert (b.train, b.val, b.probe) == (160, 30, 20)
            assert len(c.data.robustness.splits) == 7 and c.data.robustness.images == 1000
        else:
            assert (b.train, b.val, b.probe) == (40, 10, 6) and c.data.robustness is None
        method = c.method + ("-frozen_projection" if c.method == "lora"
                             and not c.lora.train_projection else "")
        cells[(c.model.rsplit("-", 1)[-1], c.data.dataset, method, c.train.lr)] += 1
    assert len(planned) == 84 and set(cells.values()) == {3}  # three seeds per cell
    core = {("patch32", d, m, lr) for d in ("eurosat", "pets") for m in ("full_ft", "lora")
            for lr in (3e-6, 1e-5, 3e-5, 1e-4)}
    refs = ({("patch32", "eurosat", m, lr) for m in ("last_block", "lora-frozen_projection")
             for lr in (1e-5, 1e-4)}
            | {("patch32", d, "linear_probe", 1e-3) for d in ("eurosat", "pets")})
    b16 = {("patch16", "eurosat", m, lr) for m in ("full_ft", "lora") for lr in (1e-5, 3e-5, 1e-4)}
    assert set(cells) == core | refs | b16


def test_study2_plan_reads_in_a_terminal():
    """At 100 columns `study plan` shows every run id whole, each group's shared keys once,
    and the keys that follow the dataset (budgets, corrupted splits) once per block of runs,
    not a 17-column table whose headers are cut to two letters."""
    from typer.testing import CliRunner

    from attndrift.cli import app
    from attndrift.study.spec import load_study

    path = ROOT / "configs" / "studies" / "study2.yaml"
    result = CliRunner().invoke(app, ["study", "plan", str(path)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    _, planned = load_study(path)
    lines = result.output.splitlines()
    for p in planned:
        assert sum(line.startswith(p.run_id + " ") for line in lines) == 1, p.run_id
    assert lines[0] == "study study2: 84 runs in 5 group(s)"
    assert any(line.startswith("core (48 runs): ") for line in lines)
    # the EuroSAT corrupted splits: once per block that has them (core, last_block,
    # lora_frozen_projection, linear_probe, b16), not once per run
    assert sum('"motion_blur"' in line for line in lines) == 5
    header = next(i for i, line in enumerate(lines) if line.startswith("run ")
                  and "method" in line)
    assert "train.lr" in lines[header] and "seed" in lines[header]
