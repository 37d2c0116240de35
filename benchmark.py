"""Speed of bcp_minimal, measured on this machine: the real training step of each stage, where a
self-training iteration spends its time, sliding-window evaluation, and the metrics vs medpy.

    python benchmark.py                                        # LA paper config, synthetic tensors
    python benchmark.py --patch 64 64 48 --root data/LA_half   # LA_half config, real data
    python benchmark.py --eval-root DIR --metrics             # evaluation time per case; vs medpy
    python benchmark.py --gpu-check --official ../BCP          # one table for a GPU, below
    python benchmark.py --networks --patch 64 64 48 --root data/LA_half --official ../BCP
    python benchmark.py --official ../BCP --root data/LA_half   # side by side, below
    python benchmark.py --official ../BCP --data ACDC_cpu --root data/ACDC --seed 2  # ACDC, too
    python benchmark.py --curve --data ACDC_cpu --root data/ACDC --work W   # time to accuracy
    python benchmark.py --curve --root data/LA_half --work W   # LA_half (W: a side by side's)

Side by side (--official DIR, a checkout of github.com/DeepMed-Lab-ECNU/BCP kept outside this
project): on the same machine and --device (auto: CUDA if there is one, else CPU, where the
official code's .cuda() calls become no-ops), one after the other, the official LA script and
bcp_minimal train with the same data, labeled cases, crop and budget; both final models are scored
by the same evaluation (bm.evaluate: sliding windows, largest component, medpy-equal metrics,
no TTA) on the same held-out cases: a validation split (the last --val cases of train.list, which
neither trains on) and the data's test.list. The official code is copied to a work folder and changed only
where a CPU and this comparison need it: the file edits of OFFICIAL_PATCHES (each printed as it is
made) and driver.py, written beside them (DRIVER: on a CPU .cuda() becomes a no-op, torchvision's
Compose is replaced by 5 lines, and the test-set checkpoint selection is switched off so that the
last checkpoint is scored). It needs `pip install scikit-image tensorboardX pyyaml`. Seconds
per iteration, twice: each stage's total over its iterations (start-up included), and from each
code's own stamps after iteration SKIP (the driver stamps the official log lines; bcp_minimal
logs every step), so that start-up, which differs between the codes, is left out.
ACDC (--data ACDC_cpu): the official ACDC_BCP_train.py at the ACDC_cpu budget (crop, batch,
3 labeled patients; iterations: the preset's or --pretrain-iters / --selftrain-iters), patched
by OFFICIAL_ACDC_PATCHES and driven by ACDC_DRIVER (its every-200-iterations selection on
val.list switched off: the last checkpoint is scored; no DataLoader worker processes on a
CPU); both final students scored by bm.evaluate on val.list; s/it both ways, as for LA.
Every result names the CPU model and its AMX / AVX512-BF16 flags (cpu_info).

GPU check (--gpu-check; synthetic volumes, no data needed, a few minutes on a current GPU; any
--device for a dry run): what --amp auto picks there, the LA preset's step per stage (it/s, peak
memory, the paper's 2 000 + 15 000 iterations projected), the official LA script's step on the
same synthetic cases with --official DIR (its steady s/it, and the ratio), and one notebook
executed (--notebook), as one table naming the device. Offline with Python 3.12: the official
scripts import `asyncore` and `imp` (unused; gone in 3.12): the drivers stand in for them; carry
the wheels of scikit-image, tensorboardX, pyyaml (and what they need) for the official code, and
nbclient, nbformat, ipykernel for the notebook.

Step times are medians over --iters iterations after --warmup, of bm.train_step itself (the
function the training loop calls). The parts of a self-training iteration (teacher forward,
pseudo-labels, student forward + backward + step, EMA) are timed separately on tensors of the
same sizes, with a device synchronisation around each, to show their shares.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bcp_minimal as bm
import get_data as gd


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup):
    """Median seconds of fn() over `iters` calls after `warmup` calls."""
    times = []
    for i in range(warmup + iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_run(cfg, device, root=None):
    """A bm.Run on real data (root, first cfg.labeled cases labeled) or on synthetic volumes."""
    g = torch.Generator().manual_seed(0)
    if root:
        _, images, labels = gd.load_split(root, "train", labeled=cfg.labeled)
    else:
        shape = tuple(s + 16 for s in cfg.patch)
        images = [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(12)]
        labels = [(np.abs(im) > 1.5).astype(np.uint8) for im in images]
    k = cfg.labeled
    model = bm.make_model(cfg, device)  # as bm.make_run
    autocast, scaler = bm.amp_setup(cfg.amp, device)
    return bm.Run(cfg, model, gd.VolumeSampler(images[:k], labels[:k], cfg.patch, device, g),
                  gd.VolumeSampler(images[k:], None, cfg.patch, device, g), g,
                  scaler=scaler, autocast=autocast)


def start_stage(run):
    """As a stage starts: a new SGD optimizer and a teacher copied from the student."""
    run.optimizer = torch.optim.SGD(run.model.parameters(), run.cfg.lr, momentum=0.9)
    run.teacher = bm.teacher_of(run.model)


def bench_steps(run, device, iters, warmup):
    """s/it of the real step of both stages (pre-training, then self-training with a teacher)."""
    out = {}
    for stage in ("pretrain", "selftrain"):
        start_stage(run)
        out[f"{stage}_s_per_it"] = timed(lambda: bm.train_step(run, stage), device, iters, warmup)
    return out


def bench_networks(a):
    """The real step with each network in turn (U-Net --top-convs 2, then 1, then 1 with --skip
    add; with --official, the official V-Net,
    dropout as in its LA script):
    --warmup steps each (where compiling happens), then --iters rounds of one step each. Per
    stage: median s/it and the median over rounds of each network's time over the first one's,
    a ratio that CPU steal and other jobs move little (they slow a round's networks alike)."""
    device = bm.pick_device(a.device)
    if a.official and min(a.patch) < 48:
        raise SystemExit(f"--patch {a.patch}: the official V-Net needs sides >= 48 (it max-pools "
                         "its S/16 bottleneck by 3); e.g. --patch 64 64 48")
    runs = {}
    for k, skip in ((2, "concat"), (1, "concat"), (1, "add")):
        cfg = bm.make_config("LA", patch=tuple(a.patch), batch_size=a.batch_size,
                             width=a.width, top_convs=k, skip=skip, amp=a.amp, device=str(device))
        name = f"U-Net, --top-convs {k}" + " --skip add" * (skip == "add")
        runs[name] = make_run(cfg, device, a.root)
    if a.official:
        sys.path.insert(0, str(Path(a.official) / "code"))
        from networks.VNet import VNet

        run = runs["official V-Net in this step"] = make_run(
            cfg, device, a.root)
        run.model = _Logits(VNet(n_channels=1, n_classes=2, normalization="batchnorm",
                                 has_dropout=True)).to(device)
    print(f"{a.patch}, batch {a.batch_size}, width {a.width}, --amp {a.amp}, "
          f"{torch.get_num_threads()} thread(s), {cpu_info() if device.type == 'cpu' else device}")
    print("| network | stage | s/it (median) | × the first, median of rounds |\n|---|---|---|---|")
    res = []
    for stage in ("pretrain", "selftrain"):
        secs = {name: [] for name in runs}
        for run in runs.values():
            start_stage(run)
            for _ in range(a.warmup):
                bm.train_step(run, stage)
        for _ in range(a.iters):
            for name, run in runs.items():
                secs[name].append(timed(lambda: bm.train_step(run, stage), device, 1, 0))
        first = secs["U-Net, --top-convs 2"]
        for name, s in secs.items():
            ratio = statistics.median(x / y for x, y in zip(s, first))
            print(f"| {name} | {stage} | {statistics.median(s):.2f} | {ratio:.2f} |")
            res.append({"network": name, "stage": stage, "s": s, "ratio": ratio})
    return res


def bench_parts(run, device, iters, warmup):
    """Seconds of each part of a self-training iteration, timed one by one on the same sizes."""
    cfg, h = run.cfg, run.cfg.batch_size // 4
    b = bm.selftrain_batch(run.lab, run.unl, run.teacher, cfg, run.g)
    u = torch.cat([b["x_in"], b["x_out"]])  # any (2h, 1, *P) tensor of the right size
    with torch.no_grad(), run.autocast():
        logits = run.teacher(u[:h])

    def teacher():
        with torch.no_grad(), run.autocast():
            run.teacher(u[:h]), run.teacher(u[h:])

    def student():
        with run.autocast():
            loss, _ = bm.stage_loss("selftrain", run.model, run.teacher, run.lab, run.unl, cfg,
                                    run.g)
        loss.backward()
        run.optimizer.step()

    parts = {"data (crops + mask + mix)": lambda: (run.lab.batch(run.lab.draw(2 * h)),
                                                   run.unl.batch(run.unl.draw(2 * h)),
                                                   bm.bcp_mask(cfg.patch, generator=run.g)),
             "teacher forward": teacher,
             "pseudo-labels (argmax + largest component)": lambda: [
                 bm.pseudo_label(logits, cfg.pseudo_lcc) for _ in range(2)],
             "EMA": lambda: bm.ema_update(run.teacher, run.model, cfg.ema_decay)}
    sec = {k: timed(f, device, iters, warmup) for k, f in parts.items()}
    sec["student forward + backward + step (incl. one data + teacher pass)"] = timed(
        student, device, iters, warmup) - sec["teacher forward"] - sec[
        "pseudo-labels (argmax + largest component)"] - sec["data (crops + mask + mix)"]
    total = sum(sec.values())
    return {k: {"s": v, "share": v / total} for k, v in sec.items()}


def bench_eval(root, patch, stride, width, device):
    """Sliding-window seconds for the first test case: 4 windows a batch vs one at a time."""
    _, images, _ = gd.load_split(root, "test")
    model = bm.UNet(1, 2, width).to(device).eval()
    x = torch.from_numpy(images[0])[None]
    return {"shape": list(images[0].shape), **{f"batch {n}": timed(
        lambda: bm.sliding_window_predict(model, x, patch, stride, batch=n), device, 1, 0)
        for n in (4, 1)}}


def bench_metrics(root, repeats=3):
    """hd95 + asd of bcp_minimal vs medpy on a real label (prediction = label shifted 2)."""
    from medpy.metric import binary

    gt = gd.load_split(root, "test")[2][0].astype(bool)
    pred = np.roll(gt, 2, axis=0)
    cpu = torch.device("cpu")
    ours = bm.surface_metrics(pred, gt)
    ref = (binary.hd95(pred, gt), binary.asd(pred, gt))
    t_ours = timed(lambda: bm.surface_metrics(pred, gt), cpu, repeats, 0)
    t_ref = timed(lambda: (binary.hd95(pred, gt), binary.asd(pred, gt)), cpu, repeats, 0)
    return {"ours": ours, "medpy": ref, "same": bool(np.allclose(ours, ref)), "ours_s": t_ours,
            "medpy_s": t_ref, "speedup": t_ref / t_ours}


# ------------------------------------------------------------------ official code, side by side
OFFICIAL_PATCHES = [  # (file, old, new, why): the only changes made to the official code
    ("LA_BCP_train.py", "patch_size = (112, 112, 80)",
     "patch_size = tuple(int(v) for v in os.environ['BCP_PATCH'].split(','))",
     "the crop of the compared budget (official: 112 x 112 x 80 hard-coded)"),
    ("utils/BCP_utils.py", "np.random.randint(0, 112 - patch_pixel_x)",
     "np.random.randint(0, img_x - patch_pixel_x)", "mask corner from the crop, not 112"),
    ("utils/BCP_utils.py", "np.random.randint(0, 112 - patch_pixel_y)",
     "np.random.randint(0, img_y - patch_pixel_y)", "mask corner from the crop, not 112"),
    ("utils/BCP_utils.py", "np.random.randint(0, 80 - patch_pixel_z)",
     "np.random.randint(0, img_z - patch_pixel_z)", "mask corner from the crop, not 80"),
    ("LA_BCP_train.py", "num_workers=4, pin_memory=True",
     "num_workers=4 * (os.environ['BCP_DEVICE'] == 'cuda'), "
     "pin_memory=os.environ['BCP_DEVICE'] == 'cuda'",
     "CPU only (CUDA keeps 4 workers): with 4 labeled cases an epoch is one batch, so 4 loader "
     "processes were started anew every iteration (2 s/it of process start-up on 2 cores); load "
     "in the main process"),
    ("LA_BCP_train.py", "if iter_num % 200 == 0:",
     "if iter_num % 200 == 0 or iter_num in (pre_max_iterations, self_max_iterations):",
     "a checkpoint at the end of each stage also for budgets that are not multiples of 200"),
]

DRIVER_PRELUDE = """
import itertools, json, logging, os, runpy, sys, time, types
import torch, torch.nn as nn
if os.environ.get("BCP_DEVICE") != "cuda":  # CPU: .cuda() is a no-op
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
class Compose:  # all the official scripts take from torchvision
    def __init__(self, fs): self.fs = fs
    def __call__(self, x):
        for f in self.fs: x = f(x)
        return x
sys.modules["torchvision"] = types.SimpleNamespace(transforms=types.SimpleNamespace(Compose=Compose))
sys.path.insert(0, os.getcwd())
for name in ("asyncore", "imp"):  # imported by the official scripts, never used; gone in 3.12
    try:
        __import__(name)
    except ImportError:
        sys.modules[name] = types.SimpleNamespace(write=print)
"""  # the start of both drivers

DRIVER = DRIVER_PRELUDE + """
from utils import test_3d_patch
count = itertools.count(1)  # no test-set selection: every evaluation "improves", the last wins
test_3d_patch.var_all_case_LA = lambda *a, **k: float(next(count))
sys.argv = ["LA_BCP_train.py"] + sys.argv[1:]
g = runpy.run_path("LA_BCP_train.py", run_name="official")
pre, selft = "model/pre_train", "model/self_train"
for d in (pre, selft):
    os.makedirs(d, exist_ok=True)
logging.basicConfig(filename="log.txt", level=logging.INFO, format="%(created).3f %(message)s")
t0 = time.time(); g["pre_train"](g["args"], pre); t1 = time.time()
g["self_train"](g["args"], pre, selft); t2 = time.time()
json.dump({"pretrain_s": t1 - t0, "selftrain_s": t2 - t1}, open("times.json", "w"))
"""


OFFICIAL_ACDC_PATCHES = [  # (file, old, new, why): the only changes made to the official code
    ("ACDC_BCP_train.py", "default=[256, 256], help='patch size of network input'",
     "default=[int(v) for v in os.environ['BCP_PATCH'].split(',')], help='patch'",
     "the crop of the compared budget (a `type=list` flag cannot be given on a command line)"),
    ("ACDC_BCP_train.py", "shutil.copy('../code/ACDC_BCP_train.py', self_snapshot_path)", "pass",
     "the copy of itself expects the folder to be named code/"),
]


ACDC_DRIVER = DRIVER_PRELUDE + """
import torch.utils.data as tud
if os.environ.get("BCP_DEVICE") != "cuda":  # CPU: load in the main process
    class Loader(tud.DataLoader):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "num_workers": 0, "pin_memory": False})
    tud.DataLoader = Loader
for name in ("cv2", "imageio"):  # imported, never used by the training
    sys.modules.setdefault(name, types.ModuleType(name))
from utils import val_2d
count = itertools.count(1)  # no val-set selection: every evaluation "improves", the last wins
val_2d.test_single_volume = lambda image, label, model, classes, **k: [[float(next(count)), 0.0]] * (classes - 1)
sys.argv = ["ACDC_BCP_train.py"] + sys.argv[1:]
g = runpy.run_path("ACDC_BCP_train.py", run_name="official")  # definitions, not the main block
args, env = g["args"], g["pre_train"].__globals__
import random, numpy as np
random.seed(args.seed); np.random.seed(args.seed); torch.manual_seed(args.seed)  # as its main
pre, selft = "model/pre_train", "model/self_train"
for d in (pre, selft):
    os.makedirs(d, exist_ok=True)
env["pre_snapshot_path"] = pre
logging.basicConfig(filename="log.txt", level=logging.INFO, format="%(created).3f %(message)s")
t0 = time.time(); g["pre_train"](args, pre); t1 = time.time()
g["self_train"](args, pre, selft); t2 = time.time()
json.dump({"pretrain_s": t1 - t0, "selftrain_s": t2 - t1}, open("times.json", "w"))
"""


def cpu_info():
    """-> 'CPU model name, N cores; AMX yes/no, AVX512-BF16 yes/no; --amp auto: bf16/fp32'
    (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    yes = lambda f: "yes" if f in flags else "no"  # noqa: E731
    auto = bm.PRECISION[bm.amp_dtype("auto", torch.device("cpu"))]
    return (f"{name}, {os.cpu_count()} cores; AMX {yes('amx_tile')}, AVX512-BF16 "
            f"{yes('avx512_bf16')}; --amp auto: {auto}")


def side_by_side_acdc(a):
    """ACDC: the official ACDC script and bcp_minimal at one budget, one after the other (or
    the other's finished run from --work); both final students scored on val.list alike."""
    work = Path(a.work or tempfile.mkdtemp(prefix="bcp_acdc_side_by_side_"))
    root = Path(a.root).resolve()
    if "ACDC" not in str(root):  # the official patients_to_slices looks for it in the path
        raise SystemExit(f"{root}: the official ACDC script needs 'ACDC' in the data path")
    cfg = bm.make_config("ACDC_cpu", root=str(root), seed=a.seed, device="cpu", eval_split="val",
                         pretrain_iters=a.pretrain_iters, selftrain_iters=a.selftrain_iters,
                         eval_tta=False)  # both scored plain: the official code has no TTA
    if a.official and (cfg.pretrain_iters % 200 or cfg.selftrain_iters % 200):
        raise SystemExit("the official script saves every 200 iterations: budgets of 200s")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "BCP_DEVICE": "cpu",
           "BCP_PATCH": ",".join(map(str, cfg.patch))}
    code, rows = work / "official", []

    def official():
        patch_official(a.official, code, OFFICIAL_ACDC_PATCHES, ACDC_DRIVER)
        subprocess.run([sys.executable, "driver.py", "--root_path", str(root), "--labelnum",
                        str(cfg.labeled), "--pre_iterations", str(cfg.pretrain_iters),
                        "--max_iterations", str(cfg.selftrain_iters), "--batch_size",
                        str(cfg.batch_size), "--labeled_bs", str(cfg.batch_size // 2), "--seed",
                        str(a.seed)], cwd=code, env=env, check=True)

    wall = run_once(code, official, bool(a.official) and a.only != "bcp_minimal")
    if wall is not None:
        times = json.loads((code / "times.json").read_text())
        net = official_acdc_net(code, code / "model/self_train/unet_best_model.pth")
        rows.append(("official BCP (UNet_2d)", times["pretrain_s"], times["selftrain_s"], wall,
                     net, [steady(s) for s in official_stamps(code / "log.txt")]))
    out = work / "bcp_minimal"
    flags = ["--data", "ACDC_cpu", "--root", str(root), "--seed", str(a.seed), "--device", "cpu",
             "--amp", a.amp, *network_flags(a), "--eval-split",
             "none", "--log-every", "1",  # scored below; a stamp per step
             "--pretrain-iters", str(cfg.pretrain_iters), "--selftrain-iters",
             str(cfg.selftrain_iters), "--out", str(out)]
    wall = run_once(out, lambda: subprocess.run(
        [sys.executable, str(Path(__file__).parent / "bcp_minimal.py"), *flags], env=env,
        check=True), a.only != "official")
    if wall is not None:
        final, trained, t_pre, t_self, per_it = finished_run(out, a)
        model = bm.make_model(trained)
        model.load_state_dict(final["model"])
        rows.append(("bcp_minimal ACDC_cpu (U-Net)", t_pre, t_self, wall, model, per_it))
    print(f"\nACDC, {cfg.labeled} labeled patients, {cfg.pretrain_iters} + "
          f"{cfg.selftrain_iters} iterations, crop {cfg.patch}, batch {cfg.batch_size}, seed "
          f"{a.seed}; {threads(a)}, {cpu_info()}; bcp_minimal --amp {a.amp}{network(a)}; scored "
          "on val.list, last checkpoints\n")
    print(f"| run | s/it pre-train | s/it self-train | s/it pre / self after iteration {SKIP} | "
          "wall (min) | val Dice | RV | Myo | LV | val 95HD |\n" + "|---" * 10 + "|")
    result = []
    for name, tp, ts, wall, net, per_it in rows:
        m = bm.evaluate(net, cfg, progress=False)
        c = m["classes"]
        print(f"| {name} | {tp / cfg.pretrain_iters:.2f} | {ts / cfg.selftrain_iters:.2f} | "
              + " / ".join("–" if v is None else f"{v:.2f}" for v in per_it) + " | "
              f"{wall / 60:.1f} | {m['dice']:.4f} | {c['RV']['dice']:.3f} | "
              f"{c['Myo']['dice']:.3f} | {c['LV']['dice']:.3f} | {m['hd95']:.2f} |")
        result.append({"run": name, "pretrain_s": tp, "selftrain_s": ts, "wall_s": wall,
                       "steady_s_it": per_it, "seed": a.seed, "machine": cpu_info(),
                       "threads": a.threads, **{
                           f"val_{k}": m[k] for k in ("dice", "jaccard", "hd95", "asd")},
                       "val_classes": c})
    (work / "side_by_side.json").write_text(json.dumps(result, indent=2))
    print(f"\nall files in {work}")
    return result


def official_acdc_net(code, path):
    """The official UNet_2d (from its copy in `code`) with the weights of checkpoint `path`
    (self_train/ holds a state dict; pre_train/ {'net', 'opt'})."""
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    from networks.unet import UNet_2d

    net, state = UNet_2d(in_chns=1, class_num=4), torch.load(path, map_location="cpu")
    net.load_state_dict(state.get("net", state))
    return net


def official_net(data, code, path):
    """The official network of `data` (LA_half: VNet; ACDC_cpu: UNet_2d), imported from its copy
    in `code`, with the weights of checkpoint `path`; returns logits as bm's models do."""
    if data == "ACDC_cpu":
        return official_acdc_net(code, path)
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    from networks.VNet import VNet

    net, state = (VNet(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=False),
                  torch.load(path, map_location="cpu"))
    net.load_state_dict(state.get("net", state))  # pre_train/ holds {'net', 'opt'}
    return _Logits(net)


def curve(a):
    """Time to accuracy: bcp_minimal's --data preset (--pretrain-iters, --selftrain-iters)
    trained with a snapshot of the student every --every iterations, each scored on the
    validation cases after the run (never used to choose anything); and, when --work holds the
    official run of a side by side (`--official DIR --work W --only official`), its checkpoints
    at the same iterations alike. LA_half trains on train.list minus its last --val cases and is
    scored on those (the side by side's split); ACDC_cpu is scored on val.list. A killed curve
    run continues from its last checkpoint when run again (its snapshots' minutes go on from
    that checkpoint's). The official run's minutes (in curve.json; plotted with
    --official-minutes): its stage times (times.json) shared evenly over each stage's
    iterations (its evaluations are switched off: every iteration costs alike).
    -> work/curve.json and work/curve.png (val Dice against wall-clock minutes and iterations)."""
    work = Path(a.work or tempfile.mkdtemp(prefix="bcp_curve_"))
    out, over = work / f"curve_s{a.seed}", {}
    if a.data == "LA_half":
        root = split_root(a.root, work / "data", a.val)[0].resolve()
        over = dict(labeled=a.labeled, patch=tuple(a.patch), eval_stride=tuple(a.eval_stride))
    else:
        root = Path(a.root).resolve()
    over.update({k: v for k, v in (("top_convs", a.top_convs), ("skip", a.skip)) if v})
    cfg = bm.make_config(a.data, root=str(root), seed=a.seed, device="cpu", eval_split="val",
                         pretrain_iters=a.pretrain_iters, selftrain_iters=a.selftrain_iters,
                         amp=a.amp, out=str(out), log_every=math.gcd(20, a.every), eval_tta=False,
                         **over)  # scored plain, both codes: the official code has no TTA
    snaps, state, spent = out / "snapshots", None, 0.0  # log_every: a log line every --every
    if not (out / "final.pt").exists() and (out / "ckpt_last.pt").exists():
        state = gd.load_checkpoint(out / "ckpt_last.pt")  # a killed curve run goes on from its
        spent = next(float(r["seconds"]) for r in csv.DictReader(open(out / "log.csv"))  # last
                     if (r["stage"], int(r["iter"])) == (state["stage"], state["iter"]))  # ckpt

    def keep(stage, it, run, rows):  # seconds: as if uninterrupted (the time up to the ckpt)
        if it % a.every == 0:
            torch.save({"model": run.model.state_dict(), "seconds": spent + float(
                rows[-1]["seconds"])}, snaps / f"{stage}_{it}.pt")
    if not (out / "final.pt").exists():
        snaps.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(a.threads)
        bm.train(cfg, state, progress=False, on_log=keep)
    # (run, iteration counted over both stages, file): ours <stage>_<it>.pt, official iter_<it>_..
    base = {"pretrain": 0, "selftrain": cfg.pretrain_iters, "pre_train": 0,
            "self_train": cfg.pretrain_iters}
    found = [("bcp_minimal", base[f.stem.rsplit("_", 1)[0]] + int(f.stem.rsplit("_", 1)[1]), f)
             for f in snaps.glob("*.pt")]
    official = work / "official"
    ckpts = [(f.parent.name, int(f.stem.split("_")[1]), f)
             for f in (official / "model").glob("*_train/iter_*.pth")]
    last = {stage: max([i for s, i, _ in ckpts if s == stage] or [1])
            for stage in ("pre_train", "self_train")}
    times = (json.loads((official / "times.json").read_text())
             if (official / "times.json").exists() else None)
    found += [("official", base[stage] + i, f) for stage, i, f in ckpts if i % a.every == 0]

    def official_at(stage, i):  # minutes: stage times shared evenly over its iterations
        before = times["pretrain_s"] if stage == "self_train" else 0
        return (before + times[f"{stage.replace('_', '')}_s"] * i / last[stage]) / 60
    model, points = bm.make_model(cfg), []
    for run, it, f in sorted(found, key=lambda r: (r[0], r[1])):
        if run == "official":
            net = official_net(a.data, official, f)
            minutes = {"minutes": official_at(f.parent.name, it - base[f.parent.name])
                       } if times else {}
        else:
            snap = torch.load(f, map_location="cpu")
            model.load_state_dict(snap["model"])
            net, minutes = model, {"minutes": snap["seconds"] / 60}
        points.append({"run": run, "iter": it, **minutes,
                       "dice": bm.evaluate(net, cfg, progress=False)["dice"]})
        print(points[-1], flush=True)
    reached = reach(points)
    if reached.get("iter"):
        print("bcp_minimal first reaches the official run's final val Dice {official_dice:.4f} "
              "at iteration {iter} (official: {official_iter}): {iter_ratio:.2f}x the iterations"
              .format(**reached) + (", {minutes_ratio:.2f}x the minutes".format(**reached)
                                    if "minutes_ratio" in reached else ""))
    elif reached:
        print(f"bcp_minimal never reaches the official run's final val Dice "
              f"{reached['official_dice']:.4f} in this curve")
    (work / "curve.json").write_text(json.dumps({"machine": cpu_info(), "threads": a.threads,
                                                 "seed": a.seed, "data": a.data, "reach": reached,
                                                 "points": points}, indent=2))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    name = {"LA_half": "LA_half, 4 labeled", "ACDC_cpu": "ACDC, 3 labeled patients"}[a.data]
    for run in ("bcp_minimal", "official"):  # official minutes: only if it ran as ours did
        pts = [p for p in points if p["run"] == run]
        timed_pts = [p for p in pts if "minutes" in p and (run == "bcp_minimal" or
                                                           a.official_minutes)]
        if timed_pts:
            left.plot([p["minutes"] for p in timed_pts], [p["dice"] for p in timed_pts], "o-",
                      label=run)
        if pts:
            right.plot([p["iter"] for p in pts], [p["dice"] for p in pts], "o-", label=run)
    left.set(xlabel=f"wall-clock minutes ({threads(a)})",
             ylabel="val Dice",
             title=f"{name}: time to accuracy\n{cpu_info().split(',')[0]}")
    right.axvline(cfg.pretrain_iters, color="gray", lw=0.8, ls=":")
    right.set(xlabel="iteration (pre-training, then self-training)", title=f"seed {a.seed}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(work / "curve.png", dpi=110)
    print(f"\n{work / 'curve.json'}, {work / 'curve.png'}")
    return points


def reach(points):
    """Where bcp_minimal's curve first reaches the official run's final val Dice (its point at
    the last iteration): -> {official_dice, official_iter, iter, iter_ratio (ours / official),
    minutes_ratio (when both have minutes)}; {} without an official curve, None-valued iter
    and ratios when bcp_minimal never reaches it."""
    official = [p for p in points if p["run"] == "official"]
    if not official:
        return {}
    last = max(official, key=lambda p: p["iter"])
    ours = sorted((p for p in points if p["run"] == "bcp_minimal"), key=lambda p: p["iter"])
    first = next((p for p in ours if p["dice"] >= last["dice"]), None)
    out = {"official_dice": last["dice"], "official_iter": last["iter"],
           "iter": first and first["iter"],
           "iter_ratio": first and first["iter"] / last["iter"]}
    if first and "minutes" in first and "minutes" in last:
        out["minutes_ratio"] = first["minutes"] / last["minutes"]
    return out


def split_root(src, dst, n_val):
    """dst: the cases of src, train.list minus its last n_val cases, those as val.list, and
    src's test.list (neither program ever reads val.list or test.list while training)."""
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / gd.CASES_DIR).exists():
        (dst / gd.CASES_DIR).symlink_to(src / gd.CASES_DIR)
    train = (src / "train.list").read_text().split()
    (dst / "train.list").write_text("\n".join(train[:-n_val]) + "\n")
    (dst / "val.list").write_text("\n".join(train[-n_val:]) + "\n")
    shutil.copy(src / "test.list", dst / "test.list")
    return dst, len(train) - n_val


def patch_official(official, work, patches=OFFICIAL_PATCHES, driver=DRIVER):
    """Copy the official code/ folder to work/, apply `patches` (each must match, each printed)
    and write `driver` as work/driver.py."""
    shutil.copytree(Path(official) / "code", work, dirs_exist_ok=True)
    for rel, old, new, why in patches:
        text = (work / rel).read_text()
        if old not in text:
            raise SystemExit(f"{work / rel}: expected `{old}`; a different official version?")
        (work / rel).write_text(text.replace(old, new))
        print(f"official patch, {rel}: `{old}` -> `{new}` ({why})")
    (work / "driver.py").write_text(driver)


def threads(a):
    return f"{a.threads} thread{'s' * (a.threads > 1)}"


class _Logits(torch.nn.Module):
    """The official VNet returns (logits, features); evaluation wants the logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


SKIP = 5  # iterations left out of the steady s/it: start-up (data, networks, first allocations)


def steady(stamps):
    """s/it of one stage from its (iteration, seconds) stamps, from the end of iteration SKIP to
    the last: the start-up both codes time inside their stages falls outside. None if too short."""
    later = [(i, t) for i, t in stamps if i >= SKIP]
    return (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0]) if len(later) > 1 else None


def official_stamps(log):
    """[pre-training, self-training] (iteration, seconds) stamps from the official log.txt: the
    driver stamps its 'iteration N : loss' lines (ACDC: 'iteration N: loss'; not the evaluations'
    'iteration N : mean_dice'); the count starts again at self-training."""
    stages, k = [[], []], 0
    for line in open(log):
        m = re.match(r"([\d.]+) iteration (\d+) ?: loss", line)
        if m:
            i, seconds = int(m[2]), float(m[1])
            if stages[0] and i <= stages[0][-1][0]:  # counted from 1 again: self-training
                k = 1
            stages[k].append((i, seconds))
    return stages


def run_once(folder, start, train):
    """Wall seconds of the run recorded in folder/wall.json, or None. If there is none and `train`,
    start() it first: a run finished in --work is reused, so the two sides can be trained at
    different times."""
    done = folder / "wall.json"
    if train and not done.exists():
        t = time.time()
        start()
        done.write_text(json.dumps({"wall_s": time.time() - t}))
    if not done.exists():
        return None
    print(f"{folder.name}: the finished run in {folder}")
    return json.loads(done.read_text())["wall_s"]


sys.path.insert(0, str(Path(__file__).parent / "notebooks"))
import build as notebook_build  # noqa: E402  (notebooks/build.py)

NOTEBOOK_ITERS = notebook_build.ITERS  # the iteration literals CI shrinks


def run_notebook(name, shrink=False):
    """Seconds to execute notebooks/<name>.ipynb headless in a copy (iteration literals set to 4
    with `shrink`); the committed notebook is not touched."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(Path(__file__).parent / "notebooks" / f"{name}.ipynb", as_version=4)
    for c in nb.cells:
        if shrink and c.cell_type == "code":
            c.source = notebook_build.shrink(c.source)
    t = time.time()
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(__file__).parent)}}).execute()
    return time.time() - t


def gpu_check(a):
    """One table for a GPU (module docstring): the LA preset's step on synthetic volumes, the
    official LA script's with --official, a notebook. -> the table's rows {what: value}."""
    device = bm.pick_device(a.device)
    cuda = device.type == "cuda"
    work = Path(a.work or tempfile.mkdtemp(prefix="bcp_gpu_check_"))
    rows = {"device": torch.cuda.get_device_name(device) if cuda else cpu_info(),
            "torch, Python": f"{torch.__version__}, {platform.python_version()}",
            "--amp auto picks": bm.PRECISION[bm.amp_dtype("auto", device)]}
    cfg = bm.make_config("LA", patch=tuple(a.patch), device=str(device), amp="auto")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps = bench_steps(make_run(cfg, device, None), device, a.iters, a.warmup)
    pre, self_ = steps["pretrain_s_per_it"], steps["selftrain_s_per_it"]
    net = f"{cfg.patch}, batch {cfg.batch_size}, --top-convs {cfg.top_convs} --skip {cfg.skip}"
    rows[f"bcp_minimal LA step ({net}), pre / self"] = f"{1 / pre:.2f} / {1 / self_:.2f} it/s"
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    rows["peak memory" + ("" if cuda else " (process RSS)")] = f"{peak:.1f} GB"
    total = (cfg.pretrain_iters * pre + cfg.selftrain_iters * self_) / 60
    rows["the paper's 2 000 + 15 000 iterations, projected"] = f"{total:.0f} min"
    if a.official:
        sys.path.insert(0, str(Path(__file__).parent / "data_samples"))
        from make_samples import make_sample_data
        data = make_sample_data(work / "data", n_train=8, n_test=2, n_val=0,
                                shape=tuple(p + 16 for p in a.patch), seed=0)
        code = work / "official"
        patch_official(a.official, code)
        env = {**os.environ, "BCP_DEVICE": device.type, "BCP_PATCH": ",".join(map(str, a.patch))}
        subprocess.run([sys.executable, "driver.py", "--root_path", str(data.resolve()),
                        "--labelnum", "4", "--max_samples", "8", "--pre_max_iteration",
                        str(a.warmup + a.iters), "--self_max_iteration",
                        str(a.warmup + a.iters), "--seed", "1337"], cwd=code, env=env, check=True)
        times = json.loads((code / "times.json").read_text())
        theirs = [steady(s) for s in official_stamps(code / "log.txt")]
        theirs = [t if t is not None else times[k] / (a.warmup + a.iters)
                  for t, k in zip(theirs, ("pretrain_s", "selftrain_s"))]
        rows["official LA_BCP_train.py step (V-Net, fp32), pre / self"] = (
            f"{1 / theirs[0]:.2f} / {1 / theirs[1]:.2f} it/s")
        rows["bcp_minimal / official time per iteration, pre / self"] = (
            f"{pre / theirs[0]:.2f}x / {self_ / theirs[1]:.2f}x")
    if a.notebook:
        rows[f"notebook {a.notebook} executed" + (" (iterations 4)" if a.iters < 5 else "")] = (
            f"{run_notebook(a.notebook, shrink=a.iters < 5):.0f} s")
    print("\n| GPU check | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items()))
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    return rows


def side_by_side(a):
    """Train the official code and bcp_minimal one after the other; score both the same way."""
    work = Path(a.work or tempfile.mkdtemp(prefix="bcp_side_by_side_"))
    root, n_train = split_root(a.root, work / "data", a.val)
    device = bm.pick_device(a.device)  # both train and are scored on it (official: CUDA or CPU)
    if device.type == "mps" and a.official:
        raise SystemExit("the official code runs on CUDA or CPU only: use --device cpu")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "BCP_DEVICE": device.type,
           "BCP_PATCH": ",".join(map(str, a.patch))}
    cfg = bm.make_config("LA_half", root=str(root), labeled=a.labeled, patch=tuple(a.patch),
                         pretrain_iters=a.pretrain_iters, selftrain_iters=a.selftrain_iters,
                         eval_stride=tuple(a.eval_stride), device=str(device), seed=a.seed,
                         eval_tta=False)  # both scored plain: the official code has no TTA
    rows = []
    code = work / "official"

    def official():
        patch_official(a.official, code)
        subprocess.run([sys.executable, "driver.py", "--root_path", str(root.resolve()),
                        "--labelnum", str(a.labeled), "--max_samples", str(n_train),
                        "--pre_max_iteration", str(a.pretrain_iters), "--self_max_iteration",
                        str(a.selftrain_iters), "--seed", str(a.seed)], cwd=code, env=env,
                       check=True)

    wall = run_once(code, official, bool(a.official) and a.only != "bcp_minimal")
    if wall is not None:
        times = json.loads((code / "times.json").read_text())
        net = official_net("LA_half", code, code / "model/self_train/VNet_best_model.pth")
        rows.append(("official BCP (VNet)", times["pretrain_s"], times["selftrain_s"], wall,
                     net.to(device), [steady(s) for s in official_stamps(code / "log.txt")]))
    out = work / "bcp_minimal"
    # bcp_minimal trains only (its wall, as the official's): both are scored below
    flags = ["--data", "LA_half", "--root", str(root), "--labeled", str(a.labeled), "--patch",
             *map(str, a.patch), "--pretrain-iters", str(a.pretrain_iters), "--selftrain-iters",
             str(a.selftrain_iters), "--eval-stride", *map(str, a.eval_stride), "--seed",
             str(a.seed), "--device", device.type, "--amp", a.amp, *network_flags(a),
             "--log-every", "1", "--eval-split", "none", "--out",
             str(out)]  # a stamp per step
    wall = run_once(out, lambda: subprocess.run(
        [sys.executable, str(Path(__file__).parent / "bcp_minimal.py"), *flags], env=env,
        check=True), a.only != "official")
    if wall is not None:
        final, trained, t_pre, t_self, per_it = finished_run(out, a)
        kept = {"student": {"model"}, "teacher": {"teacher"},  # the weights the run scores
                "ensemble": {"model", "teacher"}}[trained.eval_model]
        for key, name in (("model", "bcp_minimal student"), ("teacher", "its EMA teacher")):
            model = bm.make_model(trained).to(device)  # and predicts with (--eval-model): *
            model.load_state_dict(final[key])
            rows.append((name + " *" * (key in kept), t_pre, t_self, wall, model, per_it))
    ctx = bm.amp_setup(a.amp, device)[0]()  # bcp_minimal's precision (--amp off: fp32 too)
    prec = ("fp32" if isinstance(ctx, contextlib.nullcontext) else
            {torch.bfloat16: "bf16", torch.float16: "fp16"}[ctx.fast_dtype])
    where = (torch.cuda.get_device_name() if device.type == "cuda" else
             f"{threads(a)}, {cpu_info()}")
    print(f"\n{a.labeled} labeled, {a.pretrain_iters} + {a.selftrain_iters} iterations, patch "
          f"{a.patch}, {where}; official fp32, bcp_minimal {prec}{network(a)}; held-out: {a.val} "
          "validation cases (end of train.list) and test.list; the same fp32 evaluation for both\n")
    print(f"| run | s/it pre-train | s/it self-train | s/it pre / self after iteration {SKIP} "
          "| wall (min) | val Dice | val 95HD | test Dice | test 95HD |\n"
          "|---|---|---|---|---|---|---|---|---|")
    result = []
    for name, tp, ts, wall, net, per_it in rows:
        m = {s: bm.evaluate(net, cfg, split=s, progress=False) for s in ("val", "test")}
        print(f"| {name} | {tp / a.pretrain_iters:.2f} | {ts / max(a.selftrain_iters, 1):.2f} | "
              + " / ".join("–" if v is None else f"{v:.2f}" for v in per_it) + " | "
              f"{wall / 60:.1f} | {m['val']['dice']:.4f} | {m['val']['hd95']:.2f} | "
              f"{m['test']['dice']:.4f} | {m['test']['hd95']:.2f} |")
        result.append({"run": name, "pretrain_s": tp, "selftrain_s": ts, "wall_s": wall,
                       "steady_s_it": per_it,
                       **{f"{s}_{k}": m[s][k] for s in m for k in ("dice", "jaccard", "hd95", "asd")},
                       **{f"{s}_cases": m[s]["cases"] for s in m}})  # per case, for a closer look
    if any(name.endswith("*") for name, *_ in rows):
        print("\n* the weights bcp_minimal scores after training and --predict uses "
              "(--eval-model)")
    (work / "side_by_side.json").write_text(json.dumps(result, indent=2))
    print(f"\nall files in {work}")
    return result


def finished_run(out, a):
    """bcp_minimal's finished run in `out` -> (final checkpoint, its config: the network to
    score, stage seconds pre / self, steady s/it pre / self). A run reused from --work keeps its
    own precision and network: `a` takes them, for the table's header."""
    log = list(csv.DictReader(open(out / "log.csv")))
    t_pre = max([float(r["seconds"]) for r in log if r["stage"] == "pretrain"] or [0])
    per_it = [steady([(int(r["iter"]), float(r["seconds"])) for r in log if r["stage"] == s])
              for s in ("pretrain", "selftrain")]
    final = gd.load_checkpoint(out / "final.pt")
    trained = bm.config_from_checkpoint(final, {})
    a.amp, a.top_convs, a.skip = trained.amp, trained.top_convs, trained.skip
    return final, trained, t_pre, float(log[-1]["seconds"]) - t_pre, per_it


def network_flags(a):
    """bcp_minimal's --top-convs and --skip where given (else the preset chooses)."""
    return [*(["--top-convs", str(a.top_convs)] if a.top_convs else []),
            *(["--skip", a.skip] if a.skip else [])]


def network(a):
    """', U-Net --top-convs K --skip S' once a run's network is known."""
    return f", U-Net --top-convs {a.top_convs} --skip {a.skip}" if a.top_convs else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80], help="training crop")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--top-convs", type=int, choices=[1, 2], help="convolutions per "
                   "full-resolution U-Net block (bcp_minimal --top-convs; default: the preset's)")
    p.add_argument("--skip", choices=["concat", "add"], help="how decoder blocks get the "
                   "encoder's features (bcp_minimal --skip; default: the preset's)")
    p.add_argument("--networks", action="store_true", help="the step with each network in "
                   "turn: U-Net --top-convs 2, 1, and 1 with --skip add; the official V-Net "
                   "with --official DIR")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--root", help="real data in the official layout (default: synthetic)")
    p.add_argument("--eval-root", help="time sliding windows on this root's first test case")
    p.add_argument("--eval-patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--eval-stride", type=int, nargs=3, default=[18, 18, 4])
    p.add_argument("--metrics", action="store_true", help="hd95/asd vs medpy on --eval-root")
    p.add_argument("--gpu-check", action="store_true", help="one table for a GPU: the LA "
                   "preset's step, the official's with --official, --notebook (docstring)")
    p.add_argument("--notebook", default="02_copy_paste", help="--gpu-check: the notebook run "
                   "('' for none)")
    p.add_argument("--json", help="also write the results to this file")
    side = p.add_argument_group("side by side with the official code")
    side.add_argument("--official", help="checkout of the official BCP repository (side by side)")
    side.add_argument("--data", choices=["LA_half", "ACDC_cpu"], default="LA_half",
                      help="LA_half (the official LA script) or ACDC_cpu (the ACDC one)")
    side.add_argument("--side-by-side", action="store_true", help="the side-by-side run, with "
                      "--official or (without it) bcp_minimal alone")
    side.add_argument("--labeled", type=int, default=4)
    side.add_argument("--pretrain-iters", type=int, help="default: the --data preset's")
    side.add_argument("--selftrain-iters", type=int, help="default: the --data preset's")
    side.add_argument("--val", type=int, default=10, help="validation cases: the end of train.list")
    side.add_argument("--threads", type=int, default=2)
    side.add_argument("--seed", type=int, default=1337)
    side.add_argument("--work", help="work folder (default: a new temporary one); a run already "
                      "finished in it is reused, so the two can be trained in separate sessions")
    side.add_argument("--curve", action="store_true", help="time to accuracy of --data: "
                      "snapshots every --every iterations scored on val after the run (and the "
                      "official run's checkpoints if --work holds one) -> curve.json, curve.png")
    side.add_argument("--every", type=int, default=600, help="--curve: iterations per snapshot")
    side.add_argument("--official-minutes", action="store_true", help="--curve: plot the "
                      "official run's minutes too (when it ran alone on this machine, as ours)")
    side.add_argument("--only", choices=["official", "bcp_minimal"],
                      help="train just this one now (the other is shown if finished in --work)")
    a = p.parse_args(argv)
    if a.networks:
        return bench_networks(a)
    if a.gpu_check:
        return gpu_check(a)
    if a.curve or a.official or a.side_by_side:
        if not a.root:
            p.error(f"{'--curve' if a.curve else '--official'} needs --root (LA_half in the "
                    "official LA layout, or ACDC in the SSL4MIS layout with --data ACDC_cpu)")
        if a.only == "official" and not a.official:
            p.error("--only official needs --official DIR (a checkout of the official code)")
        a.patch = a.patch if a.patch != [112, 112, 80] else [64, 64, 48]  # LA_half's
        a.eval_stride = a.eval_stride if a.eval_stride != [18, 18, 4] else [9, 9, 2]
        preset = bm.make_config(a.data)  # the budget: the preset's unless given
        a.pretrain_iters = preset.pretrain_iters if a.pretrain_iters is None else a.pretrain_iters
        a.selftrain_iters = (preset.selftrain_iters if a.selftrain_iters is None
                             else a.selftrain_iters)
        if a.curve:
            return curve(a)
        return side_by_side_acdc(a) if a.data == "ACDC_cpu" else side_by_side(a)

    device = bm.pick_device(a.device)
    torch.backends.cudnn.benchmark = True
    cfg = bm.make_config("LA", patch=tuple(a.patch), batch_size=a.batch_size, width=a.width,
                         top_convs=a.top_convs or 2, skip=a.skip or "concat",
                         amp=a.amp, device=str(device))
    res = {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda"
                       else cpu_info(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "config": {"patch": a.patch, "batch_size": a.batch_size, "width": a.width,
                      "top_convs": cfg.top_convs, "skip": cfg.skip,
                      "data": a.root or "synthetic"}}
    run = make_run(cfg, device, a.root)
    res["steps"] = bench_steps(run, device, a.iters, a.warmup)
    res["selftrain_parts"] = bench_parts(run, device, a.iters, a.warmup)
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if a.eval_root:
        res["sliding_window_s"] = bench_eval(a.eval_root, a.eval_patch, a.eval_stride, a.width,
                                             device)
        if a.metrics:
            res["hd95_asd_vs_medpy"] = bench_metrics(a.eval_root)
    text = json.dumps(res, indent=2, default=float)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return res


if __name__ == "__main__":
    main()
