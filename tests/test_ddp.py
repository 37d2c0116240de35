"""torchrun: 2 CPU processes (gloo) train, checkpoint, resume, and shard --predict."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

nib = pytest.importorskip("nibabel")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_processes_average_gradients_resume_and_keep_one_teacher(tiny_data, tmp_path):
    """One torchrun launch (tests/ddp_check.py): student and teacher identical in both processes;
    a run killed between checkpoints and resumed ends bit for bit as the straight one (weights,
    teacher, optimizer), its log truncated and re-written once; two processes drawing the same
    crops end bit for bit as one process alone (the gradients are averaged, not summed)."""
    r = subprocess.run(TORCHRUN + [str(ROOT / "tests" / "ddp_check.py"), str(tiny_data), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ddp_check.json").read_text())
    assert res == {"one_teacher": True, "different_streams": True, "resumed_equals_straight": True,
                   "averaged_equals_one_process": True, "straight_differs_from_one_process": True,
                   "world": 2}
    logs = {n: list(csv.DictReader(open(tmp_path / n / "log.csv"))) for n in ("straight", "killed")}
    for rows in logs.values():  # written once, by the first process; the resumed one truncated
        assert [(r["stage"], int(r["iter"])) for r in rows] == [("pretrain", i) for i in range(1, 4)] + [
            ("selftrain", i) for i in range(1, 6)]
    assert [r["loss"] for r in logs["straight"]] == [r["loss"] for r in logs["killed"]]


def test_two_process_predict_writes_each_scan_once(tiny_data, trained, tmp_path):
    import h5py
    from test_predict import AFFINE

    scans = tmp_path / "in"
    scans.mkdir()
    for case in (tiny_data / "train.list").read_text().split()[:5]:
        with h5py.File(tiny_data / "2018LA_Seg_Training Set" / case / "mri_norm2.h5") as f:
            nib.save(nib.Nifti1Image(f["image"][()], AFFINE), str(scans / f"{case}.nii.gz"))
    outs = {}
    for n, cmd in [(1, [sys.executable]), (2, TORCHRUN)]:
        r = subprocess.run(cmd + [str(ROOT / "bcp_minimal.py"), "--predict", str(scans), "--ckpt",
                                  str(trained), "--out", str(tmp_path / f"p{n}")],
                           capture_output=True, text=True, timeout=600, env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = list(csv.DictReader(open(tmp_path / f"p{n}" / "volumes.csv")))
        assert sorted(r["case"] for r in rows) == sorted(p.name.split(".")[0] for p in scans.iterdir())
        outs[n] = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in (tmp_path / f"p{n}").glob("*.nii.gz")}
    assert outs[1].keys() == outs[2].keys() and len(outs[1]) == 5
    for name in outs[1]:
        np.testing.assert_array_equal(outs[1][name], outs[2][name])
