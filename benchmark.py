"""Speed of bcp_minimal, measured: training iterations per stage, where the time goes, and
ratios against a plain re-implementation of the official per-iteration pipeline.

    python benchmark.py                               # LA paper config on synthetic tensors
    python benchmark.py --patch 64 64 48 --root ../shared/data/LA_half   # + real data
    python benchmark.py --baseline                    # + the official-style pipeline, same run
    python benchmark.py --eval-root DIR --metrics     # sliding-window time per case; hd95/asd vs medpy
    python benchmark.py --gpu-check --root DIR        # the one script to run on a GPU

Every number is a median over the timed iterations after warm-up. The parts (data, teacher
forward, pseudo-labels, mix, student forward/backward/step, EMA) are timed one after another
inside a real self-training iteration, with a device synchronisation between parts (which the
training loop itself does not do), so their sum is slightly above the loop's iteration time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import bcp_minimal as bm


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Accumulates wall time per named part, synchronising the device around each part."""

    def __init__(self, device):
        self.device, self.parts = device, {}

    @contextlib.contextmanager
    def __call__(self, name):
        sync(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.parts.setdefault(name, []).append(time.perf_counter() - t)


def synthetic_sampler(n, shape, patch, device, g):
    """n random volumes of `shape` with blob labels, cropped to `patch`: the right sizes, no disk."""
    images = [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(n)]
    labels = [(np.abs(im) > 1.5).astype(np.uint8) for im in images]
    return bm.VolumeSampler(images, labels, patch, device, g)


def flops_per_iteration(model, teacher, x, nl):
    """Model FLOPs of one self-training iteration: teacher forward on nl images, student
    forward + backward on nl mixed images (backward counted by PyTorch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(x[:nl])
        model(x[:nl]).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_selftrain(cfg, lab, unl, device, iters, warmup):
    """Time self-training iterations of bcp_minimal, part by part."""
    g = lab.g
    model = bm.UNet(1, cfg.num_classes, cfg.width).to(device, memory_format=bm.MEMORY_FORMAT)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    autocast, scaler = bm.amp_setup(cfg.amp, device)
    net = torch.compile(model) if cfg.compile else model
    nl, h = cfg.batch_size // 2, cfg.batch_size // 4
    timer, totals = Timer(device), []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        if i == warmup:
            timer.parts = {}
        sync(device)
        t0 = time.perf_counter()
        with timer("data"):
            x, y = lab.batch(lab.draw(nl))
            u, _ = unl.batch(unl.draw(nl))
        with timer("teacher forward"), torch.no_grad(), autocast():
            t_logits = teacher(u)
        with timer("pseudo-labels"):
            p = bm.pseudo_label(t_logits, cfg.pseudo_lcc)
        with timer("mix"):
            M = bm.bcp_mask(cfg.patch, cfg.beta, False, g, device)
            x_in, x_out = bm.mix(x[:h], u[:h], M), bm.mix(u[h:], x[h:], M)
        with timer("student forward/backward/step"):
            with autocast():
                q = net(torch.cat([x_in, x_out]))
            loss = bm.bcp_loss(q[:h], y[:h], p[:h], M, 1.0, cfg.alpha) + \
                bm.bcp_loss(q[h:], p[h:], y[h:], M, cfg.alpha, 1.0)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        with timer("EMA"):
            bm.ema_update(teacher, model, cfg.ema_decay)
        sync(device)
        if i >= warmup:
            totals.append(time.perf_counter() - t0)
    flops = flops_per_iteration(model, teacher, torch.cat([x_in, x_out]), nl)
    return summarize("bcp_minimal self-training", totals, timer.parts, flops, device)


def bench_pretrain(cfg, lab, device, iters, warmup):
    """Whole pre-training iterations, through the training loop's own step function."""
    model = bm.UNet(1, cfg.num_classes, cfg.width).to(device, memory_format=bm.MEMORY_FORMAT)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    autocast, _ = bm.amp_setup(cfg.amp, device)
    step = bm._make_step(cfg, "pretrain", model, None, lab, None, lab.g, device, autocast)
    totals = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        loss, _ = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            totals.append(time.perf_counter() - t0)
    return summarize("bcp_minimal pre-training", totals, {}, None, device)


def bench_official_style(cfg, root, cases, device, iters, warmup):
    """A plain re-implementation of the official per-iteration pipeline (not its code):
    every sample read from its gzip'd HDF5 file, rotated/flipped/cropped in numpy, moved to
    the device; two teacher forwards of half a batch each; connected components per sample
    on the CPU with a host copy; two student forwards; a per-parameter EMA loop; and a
    loss.item() logged every iteration."""
    import h5py
    from scipy import ndimage

    rng = np.random.default_rng(0)
    px, py, pz = cfg.patch

    def load(case):
        with h5py.File(Path(root) / bm.CASES_DIR / case / bm.CASE_FILE, "r") as f:
            image, label = f["image"][:], f["label"][:]
        image, label = np.rot90(image, k := rng.integers(4)), np.rot90(label, k)
        axis = rng.integers(2)
        image, label = np.flip(image, axis), np.flip(label, axis)
        pads = [((p - s) // 2 + 3,) * 2 if s <= p else (0, 0) for s, p in zip(image.shape, (px, py, pz))]
        image, label = np.pad(image, pads), np.pad(label, pads)
        x, y, z = (rng.integers(0, s - p + 1) for s, p in zip(image.shape, (px, py, pz)))
        return image[x:x + px, y:y + py, z:z + pz].copy(), label[x:x + px, y:y + py, z:z + pz].copy()

    def lcc(mask):
        out = []
        for m in mask.cpu().numpy():
            lab, n = ndimage.label(m, np.ones((3, 3, 3)))
            out.append(lab == np.argmax(np.bincount(lab.flat)[1:]) + 1 if n else m)
        return torch.from_numpy(np.stack(out)).long().to(device)

    model = bm.UNet(1, cfg.num_classes, cfg.width).to(device)
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    nl, h = cfg.batch_size // 2, cfg.batch_size // 4
    timer, totals = Timer(device), []
    for i in range(warmup + iters):
        if i == warmup:
            timer.parts = {}
        sync(device)
        t0 = time.perf_counter()
        with timer("data"):
            batch = [load(cases[j % len(cases)]) for j in rng.integers(0, len(cases), cfg.batch_size)]
            x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None].to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).long().to(device)
        with timer("teacher forward"), torch.no_grad():
            ta, tb = ema(x[nl:nl + h]), ema(x[nl + h:])
        with timer("pseudo-labels"):
            pa = lcc(ta.softmax(1)[:, 1] >= 0.5)
            pb = lcc(tb.softmax(1)[:, 1] >= 0.5)
        with timer("mix"):
            M = bm.bcp_mask(cfg.patch, cfg.beta, False, None, device)
            xin, xout = x[:h] * M + x[nl:nl + h] * (1 - M), x[nl + h:] * M + x[h:nl] * (1 - M)
        with timer("student forward/backward/step"):
            ql, qu = model(xin), model(xout)
            loss = bm.bcp_loss(ql, y[:h], pa, M, 1.0, cfg.alpha) + bm.bcp_loss(qu, pb, y[h:nl], M, cfg.alpha, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        with timer("EMA"):
            for e, p in zip(ema.parameters(), model.parameters()):
                e.data.mul_(cfg.ema_decay).add_((1 - cfg.ema_decay) * p.data)
        sync(device)
        if i >= warmup:
            totals.append(time.perf_counter() - t0)
    return summarize("official-style pipeline", totals, timer.parts, None, device)


def summarize(name, totals, parts, flops, device):
    it = statistics.median(totals)
    out = {"name": name, "s_per_it": it, "it_per_s": 1 / it}
    if parts:
        part = {k: statistics.median(v) for k, v in parts.items()}
        s = sum(part.values())
        out["parts_s"] = part
        out["parts_share"] = {k: v / s for k, v in part.items()}
    if flops:
        out["gflop_per_it"] = flops / 1e9
        out["achieved_tflops"] = flops / it / 1e12
    out["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def bench_eval(root, patch, stride, width, device, n_cases=1):
    """Sliding-window time per case: bcp_minimal (batched windows) vs one window at a time."""
    cases, images, _ = bm.load_split(root, "test")
    model = bm.UNet(1, 2, width).to(device, memory_format=bm.MEMORY_FORMAT).eval()
    plain = bm.UNet(1, 2, width).to(device).eval()
    res = {}
    for name, net, batch in [("bcp_minimal (4 windows a batch, channels-last)", model, 4),
                             ("one window at a time", plain, 1)]:
        times = []
        for image in images[:n_cases]:
            sync(device)
            t = time.perf_counter()
            bm.sliding_window_predict(net, torch.from_numpy(image)[None], patch, stride, batch=batch)
            sync(device)
            times.append(time.perf_counter() - t)
        res[name] = statistics.median(times)
    res["shape"] = list(images[0].shape)
    return res


def bench_metrics(root, repeats=3):
    """hd95 + asd of bcp_minimal vs medpy on real labels (a prediction = label shifted)."""
    from medpy.metric import binary

    _, _, labels = bm.load_split(root, "test")
    gt = labels[0].astype(bool)
    pred = np.roll(gt, 2, axis=0)
    t = time.perf_counter()
    for _ in range(repeats):
        ours = bm.surface_metrics(pred, gt)
    t_ours = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        ref = (binary.hd95(pred, gt), binary.asd(pred, gt))
    t_ref = (time.perf_counter() - t) / repeats
    return {"ours": ours, "medpy": ref, "same": bool(np.allclose(ours, ref)), "ours_s": t_ours, "medpy_s": t_ref,
            "speedup": t_ref / t_ours}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--root", help="real data in the official layout (train.list) to time as well")
    p.add_argument("--baseline", action="store_true", help="also time the official-style pipeline (needs --root)")
    p.add_argument("--eval-root", help="time sliding-window evaluation of one test case of this root")
    p.add_argument("--eval-patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--eval-stride", type=int, nargs=3, default=[18, 18, 4])
    p.add_argument("--metrics", action="store_true", help="hd95/asd vs medpy on --eval-root's first test label")
    p.add_argument("--gpu-check", action="store_true", help="paper config + a short real training run")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()

    device = bm.pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = bm.make_config("LA", patch=tuple(a.patch), batch_size=a.batch_size, width=a.width, amp=a.amp,
                         compile=a.compile, device=str(device))
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "config": {
                "patch": a.patch, "batch_size": a.batch_size, "width": a.width, "amp": a.amp}}
    results = [info]
    g = torch.Generator().manual_seed(0)
    shape = tuple(s + 16 for s in a.patch)
    lab, unl = synthetic_sampler(4, shape, cfg.patch, device, g), synthetic_sampler(8, shape, cfg.patch, device, g)
    results.append(bench_selftrain(cfg, lab, unl, device, a.iters, a.warmup))
    results.append(bench_pretrain(cfg, lab, device, a.iters, a.warmup))
    if a.root:
        cases, images, labels = bm.load_split(a.root, "train")
        lab = bm.VolumeSampler(images[:4], labels[:4], cfg.patch, device, g)
        unl = bm.VolumeSampler(images[4:], labels[4:], cfg.patch, device, g)
        r = bench_selftrain(cfg, lab, unl, device, a.iters, a.warmup)
        r["name"] += " (real data)"
        results.append(r)
        if a.baseline:
            base = bench_official_style(cfg, a.root, cases, device, a.iters, a.warmup)
            base["speedup_of_bcp_minimal"] = base["s_per_it"] / r["s_per_it"]
            results.append(base)
    if a.eval_root:
        results.append({"sliding_window_s_per_case": bench_eval(a.eval_root, a.eval_patch, a.eval_stride,
                                                                a.width, device)})
        if a.metrics:
            results.append({"hd95_asd_vs_medpy": bench_metrics(a.eval_root)})
    if a.gpu_check:
        sched = cfg.pretrain_iters + cfg.selftrain_iters
        st = results[1]["s_per_it"]
        pt = results[2]["s_per_it"]
        results.append({"projected_full_schedule_min": (cfg.pretrain_iters * pt + cfg.selftrain_iters * st) / 60,
                        "schedule_iters": sched})
        if a.root:
            out = Path("runs/gpu_check")
            t = time.perf_counter()
            short = bm.make_config("LA", root=a.root, pretrain_iters=100, selftrain_iters=200, out=str(out),
                                   device=str(device), amp=a.amp, compile=a.compile)
            res = bm.train(short, progress=False)
            results.append({"short_real_training_s": time.perf_counter() - t, "iters": 300,
                            "test": {k: v for k, v in bm.evaluate(res["model"], short, out=out, progress=False).items()
                                     if k != "cases"}})
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
