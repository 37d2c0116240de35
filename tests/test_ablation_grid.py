"""ablation.py: the grid's order, the rule that names a row better or worse, resuming, and one
real (tiny) run of two rows through bcp_minimal.py on ACDC-like slices."""
import json

import pytest
import torch
from make_samples import make_acdc_samples

import ablation

FAST = ("--labeled 1 --pretrain-iters 2 --selftrain-iters 2 --patch 32 32 --width 2 --batch-size 8 "
        "--log-every 1 --ckpt-every 1 --device cpu")


def fake(work, row, seed, dice):
    out = work / row / f"s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"dice": dice}))


def test_plan_runs_every_row_at_a_seed_before_the_next_seed():
    rows = [("a", "", [], 3, ""), ("b", "", [], 2, ""), ("c", "", [], 1, "")]
    assert [(r[0], s) for r, s in ablation.plan(rows, [1, 2, 3])] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)]


def test_the_rule_by_hand(tmp_path):
    for s, d in zip(ablation.SEEDS, (0.80, 0.82, 0.81)):  # both: mean 0.81, sd 0.01
        fake(tmp_path, "both", s, d)
    for s, d in zip(ablation.SEEDS, (0.70, 0.72, 0.71)):  # 0.10 below: worse
        fake(tmp_path, "in", s, d)
    for s, d in zip(ablation.SEEDS, (0.815, 0.825, 0.82)):  # 0.01 above, sd 0.01: no difference
        fake(tmp_path, "out", s, d)
    for s, d in zip(ablation.SEEDS, (0.83, 0.85)):  # 0.03 above > max(0.01, 0.0141): better
        fake(tmp_path, "beta_1_2", s, d)
    fake(tmp_path, "slab", 1337, 0.5)  # one seed: no verdict yet
    by = {r["row"]: r for r in ablation.summarize(ablation.ROWS, tmp_path)}
    assert by["both"]["verdict"] == "reference" and by["both"]["mean"] == pytest.approx(0.81)
    assert by["in"]["verdict"] == "worse (-0.100)"
    assert by["out"]["verdict"] == "no difference at this budget"
    assert by["beta_1_2"]["verdict"] == "better (+0.030)"
    assert by["slab"]["verdict"] == "needs 2 seeds" and by["sup"]["mean"] is None
    text = ablation.markdown(list(by.values()))
    assert "0.700 / 0.720 / 0.710" in text and "Rule: a row is better or worse" in text


def test_label_efficiency_compares_bcp_with_sup_at_the_same_count(tmp_path):
    for s, d in zip(ablation.SEEDS, (0.5, 0.52)):  # 3 patients: the grid's own sup and both runs
        fake(tmp_path, "sup", s, d)
    for s, d in zip(ablation.SEEDS, (0.75, 0.76)):
        fake(tmp_path, "both", s, d)
    fake(tmp_path, "bcp_1", 1337, 0.4)
    by = {r["row"]: r for r in ablation.summarize(ablation.LABELS, tmp_path)}
    assert by["bcp_3"]["verdict"] == "better (+0.245)" and by["sup_3"]["verdict"] == ""
    assert by["bcp_1"]["dice"] == [0.4, None] and by["sup_7"]["mean"] is None
    ablation.figure(list(by.values()), tmp_path / "f.png", labels=True)
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "than sup at the same count only" in ablation.markdown(list(by.values()))


def test_the_label_rows_at_3_patients_are_the_grids_commands():
    """Sharing their folders is right only while ACDC_cpu's default is 3 labeled patients and
    the flags are otherwise the grid's sup and both rows."""
    import bcp_minimal
    assert bcp_minimal.PRESETS["ACDC_cpu"]["labeled"] == 3
    row = {r[0]: r for r in ablation.ROWS + ablation.LABELS}
    assert row["sup_3"][2] == row["sup"][2] + ["--labeled", "3"]
    assert row["bcp_3"][2] == ["--method", "bcp", "--labeled", "3"] and row["both"][2] == []
    a = ablation.main.__globals__["argparse"].Namespace(work="W", root="R", extra="")
    assert ablation.command(row["bcp_3"], 2, a)[1] == ablation.command(row["both"], 2, a)[1]
    assert ablation.command(row["bcp_7"], 2, a)[1].parent.name == "bcp_7"


def test_a_killed_run_is_resumed_a_finished_one_kept(tmp_path):
    a = ablation.main.__globals__["argparse"].Namespace(work=str(tmp_path), root="R", extra="")
    row = ablation.ROWS[5]
    cmd, out = ablation.command(row, 2, a)
    assert "--resume" not in cmd and cmd[cmd.index("--seed") + 1] == "2"
    out.mkdir(parents=True)
    (out / "ckpt_last.pt").write_bytes(b"")
    cmd, _ = ablation.command(row, 2, a)
    assert cmd[2:] == ["--resume", "--out", str(out)]


def test_two_rows_end_to_end_then_nothing_left_to_run(tmp_path, monkeypatch, capsys):
    root = make_acdc_samples(tmp_path / "acdc", False, 5, 3, (40, 36))
    monkeypatch.setattr(ablation, "SEEDS", [1337])
    argv = ["--root", str(root), "--work", str(tmp_path / "w"), "--rows", "both", "none",
            "--extra", FAST]
    assert ablation.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(" start ") == 2  # in the order asked for; the table keeps its own
    assert out.index("start both") < out.index("start none")
    table = json.loads((tmp_path / "w" / "table.json").read_text())
    assert [r["row"] for r in table["rows"]] == ["none", "both"]
    assert all(isinstance(r["dice"][0], float) for r in table["rows"])
    cfg = json.loads((tmp_path / "w" / "none" / "s1337" / "config.json").read_text())
    assert (cfg["direction"], cfg["selftrain_iters"], cfg["eval_split"]) == ("none", 2, "val")
    assert (tmp_path / "w" / "figure.png").is_file()
    assert ablation.main(argv) == 0 and capsys.readouterr().out.count(" start ") == 0


def test_box_share_by_hand_and_on_acdc_like_slices(tmp_path, capsys):
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 0, :] = 1  # 4 foreground pixels, 1 of them in the box
    y[0, 3, 3] = 2  # 1 more, not in it
    M = torch.ones(4, 4)
    M[0:2, 3:4] = 0  # the box: (0, 3), (1, 3)
    assert ablation.box_share(y, M) == pytest.approx(1 / 5)
    assert ablation.box_share(torch.zeros(1, 4, 4), M) == 0
    root = make_acdc_samples(tmp_path / "acdc", False, 5, 3, (40, 36))
    assert 0 < ablation.coverage(root, draws=3) <= 1
    assert ablation.main(["--root", str(root), "--coverage"]) == 0
    assert "of the labeled foreground" in capsys.readouterr().out
