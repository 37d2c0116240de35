"""End-to-end: both stages, the teacher's EMA per iteration, resume after SIGKILL, evaluation."""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, tiny_cfg

import bcp_minimal as bm
import get_data as gd


def _losses(out):
    return [(r["stage"], int(r["iter"]), float(r["loss"])) for r in csv.DictReader(open(out / "log.csv"))]


def test_two_stages_and_one_ema_step_per_iteration(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = bm.ema_update

    def checked(teacher, student, decay):
        before = [p.clone() for p in teacher.parameters()]
        real(teacher, student, decay)
        for b, t, s in zip(before, teacher.parameters(), student.parameters()):
            torch.testing.assert_close(t, decay * b + (1 - decay) * s)
        assert all(not p.requires_grad for p in teacher.parameters())
        calls.append(decay)

    monkeypatch.setattr(bm, "ema_update", checked)
    cfg = tiny_cfg(tiny_data, tmp_path, ema_decay=0.9)
    run = bm.train(cfg, progress=False)
    assert calls == [0.9] * cfg.selftrain_iters  # exactly one EMA step per self-training iteration
    rows = _losses(tmp_path)
    assert [(s, i) for s, i, _ in rows] == [("pretrain", i) for i in range(1, 4)] + [("selftrain", i) for i in range(1, 5)]
    for name in ("ckpt_last.pt", "pretrain.pt", "final.pt", "config.json"):
        assert (tmp_path / name).exists()
    saved = json.loads(json.dumps(bm.evaluate(run.model, cfg, progress=False)))
    assert len(saved["cases"]) == 2
    for key in ("dice", "jaccard", "hd95", "asd"):  # means of the per-case rows
        assert saved[key] == pytest.approx(sum(r[key] for r in saved["cases"]) / 2)


def test_selftrain_teacher_starts_as_pretrained_student(tiny_data, tmp_path, monkeypatch):
    seen = []
    real = bm.ema_update
    monkeypatch.setattr(bm, "ema_update", lambda t, s, d: (seen.append({k: v.clone() for k, v in t.state_dict().items()}), real(t, s, d)))
    bm.train(tiny_cfg(tiny_data, tmp_path, selftrain_iters=1), progress=False)
    pre = torch.load(tmp_path / "pretrain.pt", weights_only=False)["model"]
    params = [k for k in pre if "running_" not in k and "num_batches" not in k]
    for k in params:  # the teacher's weights before its first EMA step = the pre-trained student's
        assert torch.equal(seen[0][k], pre[k]), k  # (its BN statistics moved: a train-mode forward)


def test_sup_runs_bcps_schedule_on_labeled_only(tiny_data, tmp_path, monkeypatch):
    """--method sup: BCP's two stages (lr per iteration, optimizer restart), every batch from the
    labeled sampler, no mask, no teacher: the lr column of its log equals BCP's."""
    drawn, real_batch = [], gd.VolumeSampler.batch
    monkeypatch.setattr(gd.VolumeSampler, "batch", lambda self, idx: drawn.append(self.labels is not None) or real_batch(self, idx))
    made, real_sgd = [], torch.optim.SGD.__init__
    monkeypatch.setattr(torch.optim.SGD, "__init__", lambda self, *a, **k: made.append(1) or real_sgd(self, *a, **k))
    cfg = tiny_cfg(tiny_data, tmp_path / "bcp", lr_step=2, selftrain_iters=5)
    bm.train(cfg, progress=False)
    bcp_lr = [(r["stage"], r["iter"], r["lr"]) for r in csv.DictReader(open(tmp_path / "bcp" / "log.csv"))]
    drawn.clear(), made.clear()
    monkeypatch.setattr(bm, "bcp_mask", lambda *a, **k: pytest.fail("sup made a copy-paste mask"))
    monkeypatch.setattr(bm, "ema_update", lambda *a, **k: pytest.fail("sup made an EMA step"))
    run = bm.train(dataclasses.replace(cfg, method="sup", out=str(tmp_path / "sup")), progress=False)
    sup_lr = [(r["stage"], r["iter"], r["lr"]) for r in csv.DictReader(open(tmp_path / "sup" / "log.csv"))]
    assert sup_lr == bcp_lr and len(sup_lr) == 8 and bcp_lr[-1][2] != bcp_lr[0][2]
    assert drawn == [True] * 8 and run.teacher is None and made == [1, 1]  # a new SGD per stage


def test_the_loop_sets_the_lr_of_the_schedule(tiny_data, tmp_path, monkeypatch):
    """lr 0.01 through pre-training; self-training x0.1 every lr_step iterations: what the
    optimizer holds at each step, and what the log says."""
    held, real_step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: held.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    bm.train(tiny_cfg(tiny_data, tmp_path, lr_step=2, selftrain_iters=5), progress=False)
    want = [0.01] * 3 + [0.01, 0.01, 0.001, 0.001, 0.0001]
    assert held == pytest.approx(want)
    assert [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "log.csv"))] == pytest.approx(want)


def _final_tensors(out):
    state = torch.load(out / "final.pt", weights_only=False)
    opt = state["optimizer"]["state"]
    return ({"model." + k: v for k, v in state["model"].items()}
            | {"teacher." + k: v for k, v in state["teacher"].items()}
            | {f"momentum.{k}": v["momentum_buffer"] for k, v in opt.items()})


@pytest.mark.parametrize("stage, die_at", [("pretrain", 3), ("selftrain", 1), ("selftrain", 4)],
                         ids=["inside-pretraining", "at-the-stage-boundary", "mid-log"])
def test_resume_equals_uninterrupted(tiny_data, tmp_path, monkeypatch, stage, die_at):
    """Killed inside pre-training, right after it, or between checkpoints (the log then holds
    rows past the last checkpoint, which resume drops and re-logs): the resumed run's final.pt
    (student, teacher, momentum) equals the uninterrupted run's bit for bit, and so does its log.
    Dropout 0.5, so the torch random stream must be restored too."""
    kw = dict(dropout=0.5, ckpt_every=2, selftrain_iters=5)
    full = tmp_path / "full"
    bm.train(tiny_cfg(tiny_data, full, **kw), progress=False)
    cut = tmp_path / "cut"
    real, count = bm.train_step, {"selftrain": 0, "pretrain": 0}

    def dying(run, st):
        count[st] += 1
        if st == stage and count[st] == die_at:
            raise KeyboardInterrupt
        return real(run, st)

    monkeypatch.setattr(bm, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        bm.train(tiny_cfg(tiny_data, cut, **kw), progress=False)
    monkeypatch.setattr(bm, "train_step", real)
    logged = _losses(cut)
    bm.train(*bm.resume_run(cut), progress=False)
    if (stage, die_at) == ("selftrain", 4):  # iteration 3 was logged after the checkpoint at 2
        assert logged[-1][:2] == ("selftrain", 3)
    assert _losses(cut) == _losses(full)  # every row once, the same numbers
    want, got = _final_tensors(full), _final_tensors(cut)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_sigkill_then_resume_finishes(tiny_data, tmp_path):
    """A real SIGKILL of the command line at a random moment, then --resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "bcp_minimal.py"), "--root", str(tiny_data), "--out", str(out),
           "--pretrain-iters", "6", "--selftrain-iters", "14", "--patch", "16", "16", "16", "--width", "2", "--batch-size", "8",
           "--log-every", "1", "--ckpt-every", "1", "--eval-stride", "8", "8", "8", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.csv").exists() and sum(1 for _ in open(out / "log.csv")) > 10:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["cases"]
    rows = _losses(out)
    assert [(s, i) for s, i, _ in rows] == [("pretrain", i) for i in range(1, 7)] + [("selftrain", i) for i in range(1, 15)]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = bm.seg_loss
    n = {"i": 0}

    def poisoned(logits, target):
        n["i"] += 1
        return real(logits, target) * (float("nan") if n["i"] == 5 else 1.0)

    monkeypatch.setattr(bm, "seg_loss", poisoned)
    cfg = tiny_cfg(tiny_data, tmp_path, method="sup", log_every=2, ckpt_every=2, pretrain_iters=6)
    with pytest.raises(gd.UserError, match=r"pretrain iteration 5;"):
        bm.train(cfg, progress=False)
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=False)["iter"] == 4


def test_sample_command_line_small(tmp_path):
    """The default command (sample preset) with a tiny budget, as a user runs it."""
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--pretrain-iters", "2",
                        "--selftrain-iters", "2", "--out", str(out), "--root", str(tmp_path / "samples")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # a root that does not exist is an error, except for the bundled default
    assert r.returncode == 2 and "no folder" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--pretrain-iters", "2",
                        "--selftrain-iters", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert f"Dice {saved['dice']:.4f}" in r.stdout and len(saved["cases"]) == 4
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--eval", str(out / "final.pt"),
                        "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert again["dice"] == pytest.approx(saved["dice"], abs=1e-6)  # --eval scores the same model alike


@pytest.mark.skipif(not (SHARED_DATA / "LA_sample").is_dir(), reason="real LA data (../shared/data) not present")
def test_real_la_full_size_two_iterations(tmp_path):
    """The real full-resolution cases load and train (2+2 iterations, small crop to stay fast)."""
    cfg = bm.make_config("LA", root=str(SHARED_DATA / "LA_sample"), out=str(tmp_path), pretrain_iters=2,
                         selftrain_iters=2, patch=(32, 32, 32), width=2, device="cpu", log_every=1, ckpt_every=1)
    bm.train(cfg, progress=False)
    assert len(_losses(tmp_path)) == 4


@pytest.mark.parametrize("vendor, amx, avx512_bf16, auto_bf16", [
    ("Intel", True, True, True),     # Xeon 4th gen+ (AMX): bf16 1.5x faster
    ("AMD", False, True, False),     # Zen 4+: AVX512-BF16, 1.7x faster, but NaN losses on Zen 5
    ("Intel", False, True, False),   # Xeon 3rd gen (Cooper Lake): bf16 1.1-1.2x slower
    ("", False, True, False),        # AVX512-BF16 from an unknown vendor: not measured
    ("AMD", False, False, False),    # AVX2 only: bf16 would be emulated
    ("Intel", False, False, False),  # most laptops, older servers: the same
])
def test_amp_auto_on_cpu_is_bf16_where_it_measured_faster(monkeypatch, vendor, amx, avx512_bf16,
                                                           auto_bf16):
    """CPU: --amp auto is bf16 with AMX, fp32 elsewhere (docs/choices.md);
    on: bf16 anyway; off: fp32 anyway; never a GradScaler (bf16 needs none)."""
    conv, x = torch.nn.Conv3d(1, 2, 3), torch.randn(1, 1, 4, 4, 4)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(bm, "cpu_vendor", lambda: vendor)

    def dtype(mode):
        autocast, scaler = bm.amp_setup(mode, torch.device("cpu"))
        assert scaler is None
        with autocast():
            return conv(x).dtype

    assert dtype("auto") == (torch.bfloat16 if auto_bf16 else torch.float32)
    assert dtype("on") == torch.bfloat16 and dtype("off") == torch.float32


@pytest.mark.parametrize("text, vendor", [
    ("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n", "AMD"),
    ("vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n", "Intel"),
    ("processor\t: 0\nBogoMIPS\t: 243.75\n", ""),  # an ARM machine
])
def test_cpu_vendor_reads_proc_cpuinfo(monkeypatch, text, vendor):
    monkeypatch.setattr(bm.Path, "read_text", lambda self, *a, **k: text)
    assert bm.cpu_vendor() == vendor


@pytest.mark.parametrize("processor, vendor", [
    ("AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD", "AMD"),
    ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "Intel"),
    ("i386", ""),  # macOS on Intel: no vendor here, and no AVX512-BF16 in any Mac
])
def test_cpu_vendor_without_proc_cpuinfo_reads_platform(monkeypatch, processor, vendor):
    """Windows and macOS have no /proc/cpuinfo: Windows names the vendor in platform.processor()."""
    def missing(self, *a, **k):
        raise FileNotFoundError(self)
    monkeypatch.setattr(bm.Path, "read_text", missing)
    monkeypatch.setattr(bm.platform, "processor", lambda: processor)
    assert bm.cpu_vendor() == vendor


@pytest.mark.parametrize("amp, said", [("off", "fp32 (--amp off)"), ("on", "bf16 (--amp on)")])
def test_training_says_its_device_threads_and_precision(tiny_data, tmp_path, capsys, amp, said):
    """The first line of a run names what --amp chose, so that a CPU run's speed can be read."""
    try:  # CPU bf16 gives non-finite losses on some AMD CPUs (docs/choices.md): the line counts
        bm.train(tiny_cfg(tiny_data, tmp_path, amp=amp, pretrain_iters=1, selftrain_iters=1),
                 progress=False)
    except bm.UserError:
        assert amp == "on" and bm.cpu_vendor() == "AMD"
    assert capsys.readouterr().out.splitlines()[0] == (
        f"bcp on cpu, {torch.get_num_threads()} threads, {said}")


def test_bf16_step_keeps_fp32_weights_and_a_finite_loss(tiny_data, tmp_path):
    """One self-training step under CPU bf16: the loss is fp32 (losses cast the logits), the
    weights and the teacher stay fp32, and the step moves the student."""
    run = bm.make_run(tiny_cfg(tiny_data, tmp_path, amp="on"))
    run.teacher = bm.copy.deepcopy(run.model).requires_grad_(False)
    run.optimizer = torch.optim.SGD(run.model.parameters(), 0.01)
    before = [p.clone() for p in run.model.parameters()]
    dtypes = []
    run.model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    terms = bm.train_step(run, "selftrain")
    assert dtypes == [torch.bfloat16] * 2  # the student's two forwards ran under autocast
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    assert all(p.dtype == torch.float32 for p in [*run.model.parameters(), *run.teacher.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


@pytest.mark.parametrize("capability, bf16_reported, want", [
    ((9, 0), True, torch.bfloat16),   # H100/H200: native bf16, no scaler
    ((8, 0), True, torch.bfloat16),   # A100
    ((7, 5), True, torch.float16),    # T4: is_bf16_supported() says True (emulation) -> fp16
    ((7, 0), False, torch.float16),   # V100
])
def test_amp_on_cuda_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, bf16_reported, want):
    """CUDA, --amp auto: bf16 without a scaler on compute capability >= 8.0; fp16 with a
    GradScaler below, even where torch reports bf16 as supported (a T4 only emulates it)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_reported)
    import warnings
    with warnings.catch_warnings():  # without CUDA here, autocast and scaler warn and disable
        warnings.simplefilter("ignore")
        autocast, scaler = bm.amp_setup("auto", torch.device("cuda"))
        ctx = autocast()
    assert ctx.fast_dtype == want
    assert (scaler is not None) == (want == torch.float16)
    assert isinstance(scaler, torch.amp.GradScaler) or scaler is None


def _unlabeled_copy(src, dst):
    """A copy of src where the unlabeled cases (3rd on) hold no label, and one a corrupt one."""
    import shutil

    import h5py
    shutil.copytree(src, dst)
    cases = (dst / "train.list").read_text().split()
    for n, case in enumerate(cases[2:]):
        path = gd.case_path(dst, case)
        with h5py.File(path, "r") as f:
            image = f["image"][()]
        with h5py.File(path, "w") as f:
            f["image"] = image
            if case == cases[-1]:  # a label no check would pass (wrong shape, class 7): it must never be read
                f["label"] = np.full((3, 3), 7, np.uint8)
    return dst


def test_unlabeled_cases_need_no_label_and_their_labels_are_never_read(tiny_data, tmp_path):
    root = _unlabeled_copy(tiny_data, tmp_path / "data")
    cfg = tiny_cfg(root, tmp_path / "run", labeled=2)
    run = bm.make_run(cfg)
    assert run.unl.labels is None and len(run.unl.images) == 4 and len(run.lab.labels) == 2
    x, y = run.unl.batch([0, 1])
    assert x.shape == (2, 1, 16, 16, 16) and y is None
    bm.train(cfg, progress=False)  # both stages, evaluation cases still labeled
    assert (tmp_path / "run" / "final.pt").is_file()


def test_a_labeled_case_without_label_names_the_file_and_the_fix(tiny_data, tmp_path):
    root = _unlabeled_copy(tiny_data, tmp_path / "data")
    with pytest.raises(gd.UserError, match=r"mri_norm2\.h5: no dataset 'label'.*--labeled"):
        bm.make_run(tiny_cfg(root, tmp_path / "run", labeled=3))


def test_sampler_without_labels_draws_the_same_crops():
    """The unlabeled sampler holds no labels, yet its random stream is the labeled one's."""
    vol = np.random.default_rng(0).normal(size=(20, 18, 17)).astype(np.float32)
    a = gd.VolumeSampler([vol, vol + 1], [np.zeros(vol.shape, np.uint8)] * 2, (16, 16, 16), "cpu",
                         torch.Generator().manual_seed(3))
    b = gd.VolumeSampler([vol, vol + 1], None, (16, 16, 16), "cpu", torch.Generator().manual_seed(3))
    xa, _ = a.batch(a.draw(4))
    xb, yb = b.batch(b.draw(4))
    assert torch.equal(xa, xb) and yb is None


def _selftrain_run(root, out, **kw):
    run = bm.make_run(tiny_cfg(root, out, **kw))
    run.teacher = bm.copy.deepcopy(run.model).requires_grad_(False)
    run.optimizer = torch.optim.SGD(run.model.parameters(), 0.1, momentum=0.9)
    return run


def test_ema_step_follows_the_optimizer_step(tiny_data, tmp_path):
    """theta_t <- decay theta_t + (1 - decay) theta_s with the student *after* this iteration's
    SGD step (an EMA step taken before it would average the old student)."""
    run = _selftrain_run(tiny_data, tmp_path, ema_decay=0.9)
    t0 = [p.clone() for p in run.teacher.parameters()]
    s0 = [p.detach().clone() for p in run.model.parameters()]
    bm.train_step(run, "selftrain")
    s1 = [p.detach() for p in run.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(s0, s1))  # the student moved
    for t, a, b in zip(run.teacher.parameters(), t0, s1):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)


def test_torchrun_averages_gradients_over_processes(tiny_data, tmp_path, monkeypatch):
    """With 2 processes whose gradients are equal, all_reduce sums them (2g) and train_step
    divides by the world size: the step equals the single-process one (a sum would double it)."""
    steps = []
    for world in (1, 2):
        torch.manual_seed(0)
        run = _selftrain_run(tiny_data, tmp_path / str(world))
        run.world = world
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))  # 2 equal processes
        bm.train_step(run, "pretrain")
        steps.append([p.detach().clone() for p in run.model.parameters()])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b)


def test_grad_scaler_step_equals_the_unscaled_step(tiny_data, tmp_path):
    """fp16 training's GradScaler path (CUDA; a CPU scaler here): the scaled loss's gradients are
    unscaled before the SGD step, so the step is the one without a scaler."""
    steps = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        torch.manual_seed(0)
        run = _selftrain_run(tiny_data, tmp_path / str(scaler is None))
        run.scaler = scaler
        bm.train_step(run, "selftrain")
        steps.append([p.detach().clone() for p in run.model.parameters()])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resume_restores_the_grad_scaler(tiny_data, tmp_path, monkeypatch):
    """The scaler's state (scale, growth tracker) goes into every checkpoint and comes back on
    --resume: the killed-and-resumed run ends with the uninterrupted run's scaler."""
    monkeypatch.setattr(bm, "amp_setup", lambda mode, device: (bm.contextlib.nullcontext, torch.amp.GradScaler(
        "cpu", init_scale=2.0 ** 10, growth_interval=3)))
    kw = dict(ckpt_every=2, selftrain_iters=5)
    bm.train(tiny_cfg(tiny_data, tmp_path / "full", **kw), progress=False)
    real, count = bm.train_step, [0]

    def dying(run, stage):
        count[0] += 1
        if count[0] == 3 + 4:  # self-training iteration 4, after the checkpoint at 2
            raise KeyboardInterrupt
        return real(run, stage)

    monkeypatch.setattr(bm, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        bm.train(tiny_cfg(tiny_data, tmp_path / "cut", **kw), progress=False)
    monkeypatch.setattr(bm, "train_step", real)
    bm.train(*bm.resume_run(tmp_path / "cut"), progress=False)
    want, got = (torch.load(tmp_path / d / "final.pt", weights_only=False)["scaler"] for d in ("full", "cut"))
    assert want["scale"] > 2.0 ** 10 and got == want  # it grew during the run, and resumed exactly
