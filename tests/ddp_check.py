"""Run under torchrun (2 processes) by tests/test_ddp.py, all in one launch to save start-ups:
  straight  train;
  killed    the same, dying inside self-training iteration 4 (checkpoint at 2, log at 3), then
            resumed: it must end bit for bit as `straight` (model, teacher, optimizer);
  same      both processes forced to draw the same crops and masks: with averaged gradients it
            must end bit for bit as one process alone (`single`, run by the first process
            afterwards); summed or otherwise scaled gradients would not.
Writes out/ddp_check.json: whether student and teacher are identical in every process, etc."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import bcp_minimal as bm

root, out = sys.argv[1], Path(sys.argv[2])


def config(name):
    return bm.make_config("sample", root=root, out=str(out / name), labeled=2, pretrain_iters=3,
                          selftrain_iters=5, patch=(16, 16, 16), batch_size=8, width=2,
                          log_every=1, ckpt_every=2, device="cpu")


real_step, real_make_run = bm.train_step, bm.make_run
count = {"n": 0}


def dying(run, stage):
    if stage == "selftrain":
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt
    return real_step(run, stage)


def same_streams(cfg):  # every process re-seeded alike: the same crops and masks everywhere
    run = real_make_run(cfg)
    run.g.manual_seed(cfg.seed)
    return run


runs = {"straight": bm.train(config("straight"), progress=False)}
bm.train_step = dying
try:
    bm.train(config("killed"), progress=False)
except KeyboardInterrupt:  # every process stops at the same iteration, as after a crash
    bm.train_step = real_step
    dist.barrier()  # (in one script: wait until the first process has written its checkpoint)
    runs["killed"] = bm.train(*bm.resume_run(out / "killed"), progress=False)
bm.make_run = same_streams
runs["same"] = bm.train(config("same"), progress=False)
bm.make_run = real_make_run

rank, world = dist.get_rank(), dist.get_world_size()
mine = {name: {"teacher": [p.detach().clone() for p in r.teacher.parameters()],
               "student": [p.detach().clone() for p in r.model.parameters()]}
        for name, r in runs.items()}
mine["crop"] = runs["straight"].lab.batch([0])[0].sum().item()
every = [None] * world
dist.all_gather_object(every, mine)


def equal_states(a, b):
    a, b = (torch.load(out / n / "final.pt", weights_only=False) for n in (a, b))
    flat = lambda s: [t for k in ("model", "teacher") for t in s[k].values()] + [  # noqa: E731
        t for v in s["optimizer"]["state"].values() for t in v.values()]
    return all(torch.equal(x, y) for x, y in zip(flat(a), flat(b))) and len(flat(a)) == len(flat(b))


if rank == 0:
    os.environ["WORLD_SIZE"] = "1"  # the first process alone: no all-reduce at all
    bm.train(config("single"), progress=False)
    json.dump({
        "one_teacher": all(torch.equal(x, y) for e in every[1:] for n in runs for k in
                           ("teacher", "student") for x, y in zip(every[0][n][k], e[n][k])),
        "different_streams": len({e["crop"] for e in every}) == world,
        "resumed_equals_straight": equal_states("straight", "killed"),
        "averaged_equals_one_process": equal_states("same", "single"),
        "straight_differs_from_one_process": not equal_states("straight", "single"),
        "world": world}, open(out / "ddp_check.json", "w"))
dist.barrier()  # the second process waits for the first's single run
dist.destroy_process_group()
