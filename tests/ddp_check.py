"""Run under torchrun by tests/test_ddp.py: train (optionally dying at a self-training
iteration, then resuming), and report whether the teacher and student weights are identical in
every process."""
import json
import sys

import torch
import torch.distributed as dist

import bcp_minimal as bm

root, out, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = bm.make_config("sample", root=root, out=out, labeled=2, pretrain_iters=3, selftrain_iters=5,
                     patch=(16, 16, 16), batch_size=8, width=2, log_every=1, ckpt_every=1, device="cpu")
real, count = bm.train_step, {"n": 0}


def dying(run, stage):
    if stage == "selftrain":
        count["n"] += 1
        if count["n"] == die_at:
            raise KeyboardInterrupt
    return real(run, stage)


bm.train_step = dying
try:
    run = bm.train(cfg, progress=False)
except KeyboardInterrupt:  # every process stops at the same iteration, as after a crash
    bm.train_step = real
    dist.barrier()  # (in one script: wait until the first process has written its checkpoint)
    run = bm.train(*bm.resume_run(out), progress=False)  # every process resumes its own streams
rank, world = dist.get_rank(), dist.get_world_size()
mine = {"teacher": [p.detach().clone() for p in run.teacher.parameters()],
        "student": [p.detach().clone() for p in run.model.parameters()],
        "crop": run.lab.batch([0])[0].sum().item()}
every = [None] * world
dist.all_gather_object(every, mine)
if rank == 0:
    same = {k: all(torch.equal(a, b) for e in every[1:] for a, b in zip(every[0][k], e[k]))
            for k in ("teacher", "student")}
    json.dump({**same, "different_streams": len({e["crop"] for e in every}) == world,
               "world": world}, open(f"{out}/ddp_check.json", "w"))
dist.destroy_process_group()
