"""Speed of bcp_minimal, measured on this machine: the real training step of each stage, where a
self-training iteration spends its time, sliding-window evaluation, and the metrics vs medpy.

    python benchmark.py                                        # LA paper config, synthetic tensors
    python benchmark.py --patch 64 64 48 --root ../shared/data/LA_half   # LA_half config, real data
    python benchmark.py --eval-root DIR --metrics             # evaluation time per case; vs medpy
    python benchmark.py --gpu-check                           # the paper config's it/s, memory

Step times are medians over --iters iterations after --warmup, of bm.train_step itself (the
function the training loop calls). The parts of a self-training iteration (teacher forward,
pseudo-labels, student forward + backward + step, EMA) are timed separately on tensors of the
same sizes, with a device synchronisation around each, to show their shares.
"""

from __future__ import annotations

import argparse
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
        _, images, labels = bm.load_split(root, "train")
    else:
        shape = tuple(s + 16 for s in cfg.patch)
        images = [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(12)]
        labels = [(np.abs(im) > 1.5).astype(np.uint8) for im in images]
    k = cfg.labeled
    model = bm.UNet(1, cfg.num_classes, cfg.width).to(device, memory_format=bm.MEMORY_FORMAT)
    autocast, scaler = bm.amp_setup(cfg.amp, device)
    return bm.Run(cfg, model, bm.VolumeSampler(images[:k], labels[:k], cfg.patch, device, g),
                  bm.VolumeSampler(images[k:], labels[k:], cfg.patch, device, g), g,
                  scaler=scaler, autocast=autocast)


def bench_steps(run, device, iters, warmup):
    """s/it of the real step of both stages (pre-training, then self-training with a teacher)."""
    out = {}
    for stage in ("pretrain", "selftrain"):
        run.optimizer = torch.optim.SGD(run.model.parameters(), run.cfg.lr, momentum=0.9)
        if stage == "selftrain":
            run.teacher = copy.deepcopy(run.model).requires_grad_(False)
        out[f"{stage}_s_per_it"] = timed(lambda: bm.train_step(run, stage), device, iters, warmup)
    return out


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
    _, images, _ = bm.load_split(root, "test")
    model = bm.UNet(1, 2, width).to(device).eval()
    x = torch.from_numpy(images[0])[None]
    return {"shape": list(images[0].shape), **{f"batch {n}": timed(
        lambda: bm.sliding_window_predict(model, x, patch, stride, batch=n), device, 1, 0)
        for n in (4, 1)}}


def bench_metrics(root, repeats=3):
    """hd95 + asd of bcp_minimal vs medpy on a real label (prediction = label shifted 2)."""
    from medpy.metric import binary

    gt = bm.load_split(root, "test")[2][0].astype(bool)
    pred = np.roll(gt, 2, axis=0)
    cpu = torch.device("cpu")
    ours = bm.surface_metrics(pred, gt)
    ref = (binary.hd95(pred, gt), binary.asd(pred, gt))
    t_ours = timed(lambda: bm.surface_metrics(pred, gt), cpu, repeats, 0)
    t_ref = timed(lambda: (binary.hd95(pred, gt), binary.asd(pred, gt)), cpu, repeats, 0)
    return {"ours": ours, "medpy": ref, "same": bool(np.allclose(ours, ref)), "ours_s": t_ours,
            "medpy_s": t_ref, "speedup": t_ref / t_ours}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80], help="training crop")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--root", help="real data in the official layout (default: synthetic)")
    p.add_argument("--eval-root", help="time sliding windows on this root's first test case")
    p.add_argument("--eval-patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--eval-stride", type=int, nargs=3, default=[18, 18, 4])
    p.add_argument("--metrics", action="store_true", help="hd95/asd vs medpy on --eval-root")
    p.add_argument("--gpu-check", action="store_true", help="add the paper schedule's time")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)

    device = bm.pick_device(a.device)
    torch.backends.cudnn.benchmark = True
    cfg = bm.make_config("LA", patch=tuple(a.patch), batch_size=a.batch_size, width=a.width,
                         amp=a.amp, device=str(device))
    res = {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda"
                       else platform.processor() or "cpu", "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "config": {"patch": a.patch, "batch_size": a.batch_size, "width": a.width,
                      "data": a.root or "synthetic"}}
    run = make_run(cfg, device, a.root)
    res["steps"] = bench_steps(run, device, a.iters, a.warmup)
    res["selftrain_parts"] = bench_parts(run, device, a.iters, a.warmup)
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if a.gpu_check:
        s = res["steps"]
        res["paper_schedule_min"] = (cfg.pretrain_iters * s["pretrain_s_per_it"]
                                     + cfg.selftrain_iters * s["selftrain_s_per_it"]) / 60
        res["selftrain_it_per_s"] = 1 / s["selftrain_s_per_it"]
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
