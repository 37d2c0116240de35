"""Every command in README.md's ```bash blocks runs as written, each its own test.

Each runs as a subprocess in a scratch folder that holds copies of the project's files, with the
data it needs made there (phantoms, a small MSD folder, a fake ACDC). RULES says, per command,
what stands in where it cannot run here: a tiny budget appended (later flags win in argparse),
--device cpu for GPU presets, 2 gloo processes for torchrun, a folder or a server on 127.0.0.1
instead of a download. A command that matches no rule fails: a command added to the README must
run here or get a rule. Only the quick start's install and test commands are left out, by name.
"""
import csv
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
from conftest import ROOT
from make_samples import make_acdc_samples, make_phantom, make_sample_data

nib = pytest.importorskip("nibabel")

PROJECT = ["bcp_minimal.py", "get_data.py", "benchmark.py", "plots.py", "data_samples"]
EXCLUDED = {"pip install -r requirements.txt": "installs packages",
            "python -m pytest -q": "this very suite"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
TINY = "--pretrain-iters 2 --selftrain-iters 2 --width 4"  # a few iterations of a thin U-Net
TINY_3D = TINY + " --patch 16 16 16"  # for presets whose crop is bigger than these phantoms
TINY_2D = TINY + " --patch 32 32"
TORCHRUN = "python -m torch.distributed.run --standalone --nproc_per_node 2"


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, in order: comments dropped, `a && b` split."""
    cmds = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            cmds += [c.strip() for c in line.split("&&") if c.strip() and c.strip() not in cmds]
    return cmds


COMMANDS = readme_commands((ROOT / "README.md").read_text())

# ---- the stand-ins, each made once in a scratch folder ------------------------------------


def la_folder(d, where="data/LA"):
    """What `get_data.py LA` downloads (16 train + 2 test cases), as phantoms of 32^3."""
    if not (d / where / "train.list").is_file():
        make_sample_data(d / where, n_train=16, n_test=2, n_val=0, shape=(32, 32, 32), seed=3)
    return {}


SERVERS = []


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def la_mirror(d):
    """The UA-MT data/ folder served on 127.0.0.1 (no test reaches the internet)."""
    la_folder(d, "mirror")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        Quiet, directory=str(d / "mirror")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SERVERS.append(server)
    return {"url": f"http://127.0.0.1:{server.server_address[1]}"}


def acdc_folder(d):
    """The SSL4MIS ACDC zip, fetched and unzipped by hand into data/ACDC: 4 train patients."""
    if not (d / "data/ACDC").is_dir():
        make_acdc_samples(d / "data/ACDC", False, 6, 3, (40, 36))
    return {}


def task02_heart(d):
    """An MSD (v1) folder as Task02_Heart: every training scan labeled, raw MR intensities."""
    src = d / "Task02_Heart"
    if src.is_dir():
        return {}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (src / sub).mkdir(parents=True)
    rng, affine, training = np.random.default_rng(7), np.diag([1.25, 1.25, 1.37, 1.0]), []
    for i in range(10):
        image, label = make_phantom((24, 24, 16), rng)
        folder = "imagesTs" if i >= 8 else "imagesTr"
        nib.save(nib.Nifti1Image(image * 80 + 400, affine), str(src / folder / f"la_{i:03d}.nii.gz"))
        if i < 8:
            nib.save(nib.Nifti1Image(label, affine), str(src / "labelsTr" / f"la_{i:03d}.nii.gz"))
            training.append({"image": f"./imagesTr/la_{i:03d}.nii.gz",
                             "label": f"./labelsTr/la_{i:03d}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "numTraining": 8, "numTest": 2, "training": training,
        "test": [f"./imagesTs/la_{i:03d}.nii.gz" for i in (8, 9)]}))
    return {}


def scans(d):
    """scans/: one NIfTI scan and one h5 volume (the README: NIfTI or h5, a folder)."""
    if not (d / "scans").is_dir():
        (d / "scans").mkdir()
        rng = np.random.default_rng(11)
        image, _ = make_phantom((20, 20, 12), rng)
        nib.save(nib.Nifti1Image(image * 80 + 400, np.diag([1.25, 1.25, 1.25, 1.0])),
                 str(d / "scans" / "scan_a.nii.gz"))
        with h5py.File(d / "scans" / "scan_b.h5", "w") as f:
            f["image"] = make_phantom((20, 20, 12), rng)[0]
    return {}


# ---- what each command leaves behind (what the README says it does) ----------------------


def lines(path):
    return path.read_text().split()


def scored(run, n=None, split=None):
    def check(d, cmd):
        m = json.loads((d / run / "metrics.json").read_text())
        assert 0 <= m["dice"] <= 1 and (n is None or len(m["cases"]) == n)
        if split:
            assert [c["case"] for c in m["cases"]] == lines(d / split)
    return check


def downloaded(d, cmd):
    for name in ("train.list", "test.list"):
        assert lines(d / "data/LA" / name) == lines(d / "mirror" / name)


def val_held_out(d, cmd):
    """--val N: the last N cases of train.list are val.list, train.list keeps the rest."""
    n, full, half = int(re.search(r"--val (\d+)", cmd)[1]), lines(d / "data/LA/train.list"), d / "data/LA_half"
    assert lines(half / "val.list") == full[-n:] and lines(half / "train.list") == full[:-n]


def heart_folder(d, cmd):
    """Every scan labeled: --val N of them held out, some kept labeled, the rest unlabeled."""
    meta = json.loads((d / "data/Heart/bcp_dataset.json").read_text())["config"]
    assert len(lines(d / "data/Heart/val.list")) == int(re.search(r"--val (\d+)", cmd)[1])
    assert 1 <= meta["labeled"] < len(lines(d / "data/Heart/train.list"))  # some unlabeled


def masks(names):
    def check(d, cmd):
        rows = list(csv.DictReader(open(d / "masks/volumes.csv")))
        assert sorted({r["case"] for r in rows}) == names
        assert all((d / "masks" / f"{n}.nii.gz").is_file() for n in names)
    return check


# ---- the rules: a README command (regex) -> how it runs here -------------------------------
# group: its scratch folder (shared with the commands it follows); make: stand-ins made there
# first; after: README commands run there first, as written (by their own rules); sub: what
# cannot run here -> what stands in; add: flags appended; check: what the command leaves.
RULES = {
    r"^python bcp_minimal\.py$": dict(group="sample", add=TINY, check=scored("runs/sample", 4)),
    r"^python bcp_minimal\.py --data LA_half$": dict(  # the download: a local data/LA
        group="auto", make=[la_folder], add=TINY_3D, check=scored("runs/LA_half", 2)),
    r"^python bcp_minimal\.py --data LA$": dict(  # a GPU preset
        group="la_gpu", make=[la_folder], add=TINY_3D + " --device cpu", check=scored("runs/LA", 2)),
    r"^python bcp_minimal\.py --data ACDC_cpu\b": dict(
        group="acdc", make=[acdc_folder], add=TINY_2D, check=scored("runs/ACDC_cpu", 2)),
    r"^python get_data\.py LA --root data/LA$": dict(
        group="la", make=[la_mirror], add="--url {url}", check=downloaded),
    r"^python get_data\.py LA_half --src data/LA --root data/LA_half\b": dict(
        group="la", after=[r"^python get_data\.py LA --root data/LA$"], check=val_held_out),
    r"^python bcp_minimal\.py --data LA_half --out runs/la\b": dict(
        group="la", after=[r"^python get_data\.py LA_half "], add=TINY_3D,
        check=scored("runs/la", 2)),
    r"^python bcp_minimal\.py --resume --out runs/la$": dict(
        group="la", after=[r"--data LA_half --out runs/la"]),
    r"^python bcp_minimal\.py --eval runs/la/final\.pt --eval-split val$": dict(
        group="la", after=[r"--data LA_half --out runs/la"],
        check=scored("runs/la/eval_final", split="data/LA_half/val.list")),
    r"^python bcp_minimal\.py --predict scans/ --ckpt runs/la/final\.pt --out masks/$": dict(
        group="la", make=[scans], after=[r"--data LA_half --out runs/la"],
        check=masks(["scan_a", "scan_b"])),
    r"^torchrun --nproc_per_node \d+ bcp_minimal\.py --data LA\b": dict(  # GPUs: 2 CPU processes
        group="la_ddp", make=[la_folder], sub=(r"^torchrun --nproc_per_node \d+", TORCHRUN),
        add=TINY_3D + " --device cpu", check=scored("runs/LA", 2)),
    r"^python get_data\.py nifti --src Task02_Heart --root data/Heart\b": dict(
        group="heart", make=[task02_heart], check=heart_folder),
    r"^python bcp_minimal\.py --root data/Heart$": dict(
        group="heart", after=[r"^python get_data\.py nifti "], add=TINY_3D,
        check=scored("runs/Heart", 2)),
    r"^python bcp_minimal\.py --predict Task02_Heart/imagesTs --ckpt runs/Heart/final\.pt": dict(
        group="heart", after=[r"^python bcp_minimal\.py --root data/Heart$"],
        check=masks(["la_008", "la_009"])),
}


def rule_for(cmd):
    return next((rule for pattern, rule in RULES.items() if re.search(pattern, cmd)), None)


class Scratch:
    """One folder per group; each command runs once, its `after` commands first."""

    def __init__(self, factory):
        self.factory, self.folders, self.done = factory, {}, {}

    def folder(self, group):
        if group not in self.folders:
            d = self.folders[group] = self.factory.mktemp(group)
            for name in PROJECT:
                (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, d / name)
        return self.folders[group]

    def run(self, cmd):
        if cmd in self.done:
            return self.done[cmd]
        rule = rule_for(cmd)
        if rule is None:
            pytest.fail(f"README command `{cmd}` matches no rule in tests/test_readme.py: make it "
                        "run here, or add a rule saying what stands in for it")
        d, fields = self.folder(rule["group"]), {}
        for pattern in rule.get("after", []):
            (first,) = [c for c in COMMANDS if re.search(pattern, c)]
            if self.run(first).returncode:
                pytest.fail(f"`{first}`, which this command follows in the README, failed")
        for make in rule.get("make", []):
            fields.update(make(d))
        line = re.sub(*rule["sub"], cmd) if "sub" in rule else cmd
        argv = shlex.split(line) + shlex.split(rule.get("add", "").format(**fields))
        argv = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(argv)]
        self.done[cmd] = subprocess.run(argv, cwd=d, env=ENV, capture_output=True, text=True,
                                        timeout=600)
        return self.done[cmd]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    yield Scratch(tmp_path_factory)
    for server in SERVERS:
        server.shutdown()
        server.server_close()


def test_the_quick_start_installs_and_tests_and_nothing_else_is_left_out():
    quick = readme_commands((ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0])
    assert set(EXCLUDED) <= set(quick), "an excluded command is no longer in the quick start"
    assert quick[:3] == ["pip install -r requirements.txt", "python bcp_minimal.py", "python -m pytest -q"]


def test_every_rule_is_used():
    unused = [p for p in RULES if not any(re.search(p, c) for c in COMMANDS)]
    assert not unused, f"rules for commands no longer in the README: {unused}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in EXCLUDED])
def test_readme_command_runs_as_written(cmd, scratch):
    r = scratch.run(cmd)
    assert r.returncode == 0, f"`{cmd}` exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
    check = rule_for(cmd).get("check")
    if check:
        check(scratch.folder(rule_for(cmd)["group"]), cmd)
