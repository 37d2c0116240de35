"""benchmark.py runs end to end on a tiny config and times the real training step (its numbers
are not asserted: timings belong in the script's output, not in tests)."""
import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import bcp_minimal as bm
import benchmark
import get_data as gd


@pytest.fixture
def scored(monkeypatch):
    """The eval_tta of every bm.evaluate call, in order: the side by sides and curves score both
    codes plain (the official code has no TTA; the LA_half and ACDC_cpu presets do)."""
    calls, evaluate = [], bm.evaluate
    monkeypatch.setattr(bm, "evaluate", lambda net, cfg, **k: calls.append(cfg.eval_tta) or evaluate(net, cfg, **k))
    return calls


def test_benchmark_times_the_real_step(tmp_path, monkeypatch):
    calls = []
    real = bm.train_step
    monkeypatch.setattr(bm, "train_step", lambda run, stage: (
        calls.append((stage, len(run.model.enc0))), real(run, stage))[1])  # enc0: 3 = one conv
    out = tmp_path / "bench.json"
    benchmark.main(["--patch", "16", "16", "16", "--width", "2", "--iters", "1", "--warmup", "1",
                    "--root", str(ROOT / "data_samples"), "--eval-root", str(ROOT / "data_samples"),
                    "--eval-patch", "16", "16", "16", "--eval-stride", "16", "16", "16", "--metrics",
                    "--device", "cpu", "--json", str(out), "--top-convs", "1"])
    assert calls == [("pretrain", 3)] * 2 + [("selftrain", 3)] * 2  # warm-up + timed, the real step
    res = json.loads(out.read_text())
    assert set(res["steps"]) == {"pretrain_s_per_it", "selftrain_s_per_it"}
    assert abs(sum(p["share"] for p in res["selftrain_parts"].values()) - 1) < 1e-6
    assert res["hd95_asd_vs_medpy"]["same"] is True


def test_networks_times_each_network_in_turn_with_paired_ratios(monkeypatch):
    """--networks: per stage, a warm-up step of each network, then rounds of one real step each
    (U-Net --top-convs 2, then 1, then 1 --skip add); the ratio is the median over rounds of
    network / first."""
    seen, real = [], bm.train_step
    monkeypatch.setattr(bm, "train_step", lambda run, stage: (
        seen.append((stage, len(run.model.enc0), run.model.add)), real(run, stage))[1])
    times = iter([1.0, 3.0, 1.0, 2.0, 1.0, 1.0,  # (top2, top1, top1 add) per round
                  4.0, 2.0, 1.0, 2.0, 6.0, 1.0])
    monkeypatch.setattr(benchmark, "timed", lambda fn, *_: (fn(), next(times))[1])
    res = benchmark.main(["--networks", "--patch", "16", "16", "16", "--width", "2", "--iters", "2",
                          "--warmup", "1", "--device", "cpu"])
    nets = [(6, False), (3, False), (3, True)]  # warm-up, then 2 rounds, each network in turn
    assert seen == [(s, *n) for s in ("pretrain", "selftrain") for n in nets * 3]
    assert [r["network"] for r in res[:3]] == [
        "U-Net, --top-convs 2", "U-Net, --top-convs 1", "U-Net, --top-convs 1 --skip add"]
    assert [(r["stage"], r["s"], r["ratio"]) for r in res] == [
        ("pretrain", [1.0, 2.0], 1.0), ("pretrain", [3.0, 1.0], 1.75),  # median(3/1, 1/2)
        ("pretrain", [1.0, 1.0], 0.75),  # median(1/1, 1/2)
        ("selftrain", [4.0, 2.0], 1.0), ("selftrain", [2.0, 6.0], 1.75),  # median(2/4, 6/2)
        ("selftrain", [1.0, 1.0], 0.375)]  # median(1/4, 1/2)


def test_side_by_side_split_and_official_patches(tiny_data, tmp_path):
    """The held-out split never overlaps training, and every official patch must match its text
    (a fake official tree here: no test needs the official code)."""
    root, n_train = benchmark.split_root(tiny_data, tmp_path / "split", n_val=2)
    train, val = (root / "train.list").read_text().split(), (root / "val.list").read_text().split()
    assert n_train == len(train) == 4 and not set(train) & set(val)
    assert train + val == (tiny_data / "train.list").read_text().split()
    assert (root / "test.list").read_text() == (tiny_data / "test.list").read_text()
    fake = tmp_path / "official" / "code"
    for rel, old, _, _ in benchmark.OFFICIAL_PATCHES:
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(fake / rel, "a") as f:
            f.write(old + "\n")
    benchmark.patch_official(tmp_path / "official", tmp_path / "work")
    for rel, old, new, _ in benchmark.OFFICIAL_PATCHES:
        text = (tmp_path / "work" / rel).read_text()
        assert new in text
    assert (tmp_path / "work" / "driver.py").exists()


def test_steady_s_it_leaves_out_the_start_up(tmp_path):
    """Per-iteration times from each code's own stamps, from the end of iteration SKIP on: a slow
    start (data loading, 20 s here) does not count. The official log is written with the
    driver's own format; its iteration count starts again at self-training."""
    assert benchmark.SKIP == 5
    pre = [(1, 20.0), (2, 21.0), (3, 22.0), (4, 23.0), (5, 24.0), (6, 24.5), (7, 25.0), (9, 26.0)]
    assert benchmark.steady(pre) == 0.5  # (26 - 24) / (9 - 5)
    assert benchmark.steady(pre[:5]) is None
    fmt = re.search(r'format="(.*?)"', benchmark.DRIVER)[1]
    handler = logging.FileHandler(tmp_path / "log.txt")
    handler.setFormatter(logging.Formatter(fmt))
    log = logging.getLogger("official_test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for line in ("1 iterations per epoch", "iteration 1 : loss: 0.9", "iteration 2 : loss: 0.8",
                 "save best model to x", "iteration 3 : loss: 0.7", "1 iterations per epoch",
                 "iteration 1 : loss: 0.6", "iteration 2 : loss: 0.5"):
        log.info(line)
    handler.close()
    stages = benchmark.official_stamps(tmp_path / "log.txt")
    assert [[i for i, _ in s] for s in stages] == [[1, 2, 3], [1, 2]]
    times = [t for s in stages for _, t in s]
    assert times == sorted(times) and abs(times[0] - time.time()) < 60
    # ACDC: its driver logs alike; 'iteration N: loss' lines, and evaluations' that are not steps
    assert re.search(r'format="(.*?)"', benchmark.ACDC_DRIVER)[1] == fmt
    lines = ["Start pre_training", "iteration 1: loss: 0.9, mix_dice: 0.5", "iteration 2: loss: 0.8",
             "iteration 2 : mean_dice : 0.1", "Start self_training", "iteration 1: loss: 0.6",
             "iteration 2: loss: 0.5", "iteration 2 : mean_dice : 0.2", "iteration 3: loss: 0.4"]
    (tmp_path / "acdc.txt").write_text("".join(f"{100 + k}.5 {ln}\n" for k, ln in enumerate(lines)))
    stages = benchmark.official_stamps(tmp_path / "acdc.txt")
    assert stages == [[(1, 101.5), (2, 102.5)], [(1, 105.5), (2, 106.5), (3, 108.5)]]


def test_driver_makes_cuda_a_no_op_only_off_cuda():
    """The official script calls .cuda() everywhere: with BCP_DEVICE=cpu the driver makes it a
    no-op; with BCP_DEVICE=cuda it is left alone (so on a machine without CUDA it must fail)."""
    code = benchmark.DRIVER.split("class Compose")[0] + "print(torch.zeros(1).cuda().device.type)"

    def run(device):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "BCP_DEVICE": device})
    assert run("cpu").stdout.split() == ["cpu"]
    if not torch.cuda.is_available():
        assert run("cuda").returncode != 0


def test_side_by_side_trains_and_scores_bcp_minimal(tiny_data, tmp_path, scored):
    """The side-by-side mode without --official: bcp_minimal trains through its command line on
    the split (--amp, --top-convs, --skip passed on), then student and teacher are scored on the
    held-out lists; a second call reuses the finished run instead of training again."""
    argv = ["--side-by-side", "--root", str(tiny_data), "--work", str(tmp_path / "w"), "--val", "2",
            "--labeled", "2", "--pretrain-iters", "2", "--selftrain-iters", "2", "--patch", "16",
            "16", "16", "--eval-stride", "8", "8", "8", "--device", "cpu", "--threads", "1", "--amp", "off", "--top-convs", "1",
            "--skip", "add"]
    res = benchmark.main(argv)
    assert scored == [False] * 4  # student and teacher, val and test
    cfg = json.loads((tmp_path / "w" / "bcp_minimal" / "config.json").read_text())
    assert (cfg["amp"], cfg["top_convs"], cfg["skip"]) == ("off", 1, "add")  # passed on;
    # scored as that network
    assert cfg["eval_split"] == "none"  # its wall is training only, as the official's; scored here
    assert cfg["log_every"] == 1 and res[0]["steady_s_it"] == [None, None]  # a stamp per step;
    # 2 + 2 iterations: too few past SKIP
    assert [r["run"] for r in res] == ["bcp_minimal student *", "its EMA teacher"]
    assert all(0 <= r[f"{s}_dice"] <= 1 for r in res for s in ("val", "test"))
    assert [c["case"] for c in res[0]["val_cases"]] == (tiny_data / "train.list").read_text().split()[-2:]
    log = (tmp_path / "w" / "bcp_minimal" / "log.csv").read_text()
    assert benchmark.main(argv)[0]["wall_s"] == res[0]["wall_s"]  # reused, not retrained
    assert (tmp_path / "w" / "bcp_minimal" / "log.csv").read_text() == log
    final = tmp_path / "w" / "bcp_minimal" / "final.pt"  # a run that scores the ensemble: both *
    state = torch.load(final, weights_only=False)
    torch.save({**state, "cfg": {**state["cfg"], "eval_model": "ensemble"}}, final)
    assert [r["run"] for r in benchmark.main(argv)] == ["bcp_minimal student *", "its EMA teacher *"]


def test_acdc_curve_scores_a_snapshot_every_n_iterations(tmp_path):
    from make_samples import make_acdc_samples

    root = make_acdc_samples(tmp_path / "ACDC", False, 6, 3, (40, 36))  # 4 train patients
    points = benchmark.main(["--curve", "--data", "ACDC_cpu", "--root", str(root), "--work", str(tmp_path / "w"),
                             "--pretrain-iters", "2", "--selftrain-iters", "4", "--every", "2", "--threads", "1",
                             "--amp", "off", "--top-convs", "1", "--skip", "add"])
    assert [p["iter"] for p in points] == [2, 4, 6]  # pre-training 2, then self-training 2 and 4
    cfg = json.loads((tmp_path / "w" / "curve_s1337" / "config.json").read_text())
    assert (cfg["amp"], cfg["top_convs"], cfg["skip"]) == ("off", 1, "add")  # passed on; scored as it
    assert all(0 <= p["dice"] <= 1 for p in points) and points[0]["minutes"] < points[-1]["minutes"]
    saved = json.loads((tmp_path / "w" / "curve.json").read_text())
    assert saved["points"] == points and "AMX" in saved["machine"]
    assert (tmp_path / "w" / "curve.png").stat().st_size > 10_000


def test_la_curve_adds_the_official_checkpoints_at_the_same_iterations(tiny_data, tmp_path, monkeypatch,
                                                                      scored):
    """LA_half: trained on the side by side's split, scored on its val cases; the official run's
    checkpoints found in --work (faked here: no test needs the official code) join at multiples
    of --every, each at its stage's share of the official stage times."""
    official = tmp_path / "w" / "official"
    for stage, its in (("pre_train", (2,)), ("self_train", (2, 3, 4))):
        (official / "model" / stage).mkdir(parents=True)
        for i in its:
            torch.save({}, official / "model" / stage / f"iter_{i}_dice_{i}.0.pth")
    (official / "times.json").write_text(json.dumps({"pretrain_s": 60, "selftrain_s": 120}))
    loaded = []
    monkeypatch.setattr(benchmark, "official_net", lambda data, code, path: loaded.append(
        (data, path.parent.name, path.name)) or bm.UNet(1, 2, 2))
    points = benchmark.main(["--curve", "--root", str(tiny_data), "--work", str(tmp_path / "w"), "--val",
                             "2", "--labeled", "2", "--patch", "16", "16", "16", "--eval-stride", "8", "8",
                             "8", "--pretrain-iters", "2", "--selftrain-iters", "4", "--every", "2", "--threads", "1"])
    ours = [p for p in points if p["run"] == "bcp_minimal"]
    theirs = [p for p in points if p["run"] == "official"]
    assert [p["iter"] for p in ours] == [2, 4, 6] and [p["iter"] for p in theirs] == [2, 4, 6]
    assert scored and not any(scored)
    assert [p["minutes"] for p in theirs] == [1.0, 2.0, 3.0]  # 60 s * 2/2; (60 + 120 * 2/4) s; 180 s
    assert loaded == [("LA_half", "pre_train", "iter_2_dice_2.0.pth"),
                      ("LA_half", "self_train", "iter_2_dice_2.0.pth"),
                      ("LA_half", "self_train", "iter_4_dice_4.0.pth")]
    cfg = gd.load_checkpoint(tmp_path / "w" / "curve_s1337" / "final.pt")["cfg"]
    assert (Path(cfg["root"]) / "val.list").read_text().split() == (tiny_data / "train.list").read_text().split()[-2:]
    assert json.loads((tmp_path / "w" / "curve.json").read_text())["data"] == "LA_half"
    from matplotlib.figure import Figure

    drawn = []  # the minutes panel shows the official run only with --official-minutes
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(
        [line.get_label() for line in fig.axes[0].get_lines()]))
    for flag in ([], ["--official-minutes"]):
        benchmark.main(["--curve", "--root", str(tiny_data), "--work", str(tmp_path / "w"), "--val", "2",
                        "--labeled", "2", "--patch", "16", "16", "16", "--eval-stride", "8", "8", "8",
                        "--pretrain-iters", "2", "--selftrain-iters", "4", "--every", "2", "--threads",
                        "1", *flag])  # final.pt exists: scored again, not trained
    assert drawn == [["bcp_minimal"], ["bcp_minimal", "official"]]


def test_acdc_side_by_side_trains_bcp_minimal_at_the_given_budget(tmp_path, scored):
    """--side-by-side --data ACDC_cpu without --official: bcp_minimal alone, through its command
    line, at --pretrain-iters / --selftrain-iters (the budget both sides share) with the network
    asked for, scored on val as that network."""
    from make_samples import make_acdc_samples

    root = make_acdc_samples(tmp_path / "ACDC", False, 6, 3, (40, 36))
    res = benchmark.main(["--side-by-side", "--data", "ACDC_cpu", "--root", str(root), "--work",
                          str(tmp_path / "w"), "--pretrain-iters", "2", "--selftrain-iters", "4",
                          "--threads", "1", "--amp", "off", "--top-convs", "1", "--skip", "add"])
    assert [r["run"] for r in res] == ["bcp_minimal ACDC_cpu (U-Net)"] and 0 <= res[0]["val_dice"] <= 1
    assert scored == [False]
    cfg = json.loads((tmp_path / "w" / "bcp_minimal" / "config.json").read_text())
    assert (cfg["pretrain_iters"], cfg["selftrain_iters"], cfg["amp"], cfg["eval_split"]) == (2, 4, "off", "none")
    assert (cfg["top_convs"], cfg["skip"]) == (1, "add")  # passed on (scored as it: the weights load)
    assert cfg["log_every"] == 1 and res[0]["steady_s_it"] == [None, None]  # a stamp per step;
    # 2 + 4 iterations: too few past SKIP


def test_a_killed_curve_run_resumes_and_its_minutes_go_on(tmp_path, monkeypatch):
    from make_samples import make_acdc_samples

    root = make_acdc_samples(tmp_path / "ACDC", False, 6, 3, (40, 36))
    argv = ["--curve", "--data", "ACDC_cpu", "--root", str(root), "--work", str(tmp_path / "w"),
            "--pretrain-iters", "2", "--selftrain-iters", "4", "--every", "2", "--threads", "1"]
    real, calls = bm.train, []

    def killed(cfg, state=None, progress=True, on_log=None):  # dies at self-training iteration 2
        def hook(stage, it, run, rows):
            on_log(stage, it, run, rows)
            if stage == "selftrain" and it == 2:
                raise KeyboardInterrupt
        return real(cfg, state, progress, hook)
    monkeypatch.setattr(bm, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)
    out = tmp_path / "w" / "curve_s1337"
    assert not (out / "final.pt").exists() and gd.load_checkpoint(out / "ckpt_last.pt")["stage"] == "pretrain"
    spent = next(float(r["seconds"]) for r in csv.DictReader(open(out / "log.csv"))
                 if (r["stage"], r["iter"]) == ("pretrain", "2"))  # the checkpoint's time
    monkeypatch.setattr(bm, "train", lambda cfg, state=None, **k: calls.append(state) or real(cfg, state, **k))
    points = benchmark.main(argv)
    assert calls[0] is not None and (calls[0]["stage"], calls[0]["iter"]) == ("pretrain", 2)
    assert [p["iter"] for p in points] == [2, 4, 6]
    again = {int(r["iter"]): float(r["seconds"]) for r in csv.DictReader(open(out / "log.csv"))
             if r["stage"] == "selftrain"}  # seconds of the resumed process
    for p, it in zip(points[1:], (2, 4)):  # after the kill: the checkpoint's time + the new time
        assert p["minutes"] * 60 == pytest.approx(spent + again[it], abs=1e-6)


@pytest.mark.parametrize("vendor, amx, flags, says", [
    ("AuthenticAMD", False, "avx2 avx512f avx512_bf16", "AMX no, AVX512-BF16 yes; --amp auto: fp32"),
    ("GenuineIntel", False, "avx2 avx512f avx512_bf16", "AMX no, AVX512-BF16 yes; --amp auto: fp32"),
    ("GenuineIntel", True, "avx512_bf16 amx_tile", "AMX yes, AVX512-BF16 yes; --amp auto: bf16"),
])
def test_cpu_info_names_the_flags_and_what_amp_auto_picks(monkeypatch, vendor, amx, flags, says):
    text = f"vendor_id\t: {vendor}\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags,
                        raising=False)
    assert benchmark.cpu_info() == f"Some CPU, {os.cpu_count()} cores; {says}"


def test_reach_finds_where_ours_first_meets_the_official_final_dice():
    pts = [{"run": "official", "iter": 600, "minutes": 10.0, "dice": 0.70},
           {"run": "official", "iter": 1800, "minutes": 30.0, "dice": 0.72},  # final: 0.72
           {"run": "bcp_minimal", "iter": 1200, "minutes": 6.0, "dice": 0.73},
           {"run": "bcp_minimal", "iter": 600, "minutes": 3.0, "dice": 0.71},
           {"run": "bcp_minimal", "iter": 1800, "minutes": 9.0, "dice": 0.75}]
    r = benchmark.reach(pts)
    assert (r["official_dice"], r["official_iter"], r["iter"]) == (0.72, 1800, 1200)
    assert r["iter_ratio"] == pytest.approx(1200 / 1800) and r["minutes_ratio"] == pytest.approx(6 / 30)
    never = benchmark.reach([p for p in pts if p["run"] == "official" or p["dice"] < 0.72])
    assert never["iter"] is None and "minutes_ratio" not in never
    assert benchmark.reach([p for p in pts if p["run"] == "bcp_minimal"]) == {}
