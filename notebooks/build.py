"""Write the notebooks' set-up cell and Colab links, then execute every notebook in place.

    python notebooks/build.py              # all six, about 20 min on a 2-core CPU
    python notebooks/build.py 02 04        # only these
    python notebooks/build.py --links-only # rewrite set-up cells and Colab links, run nothing

REPO below is the one place that holds the project's address: the set-up cell of every
notebook and the Colab link in each notebook's title (and any in README.md, which has none while
REPO is the placeholder) are written from it. Publish the project, put its address here, run
`--links-only`, commit.

Each executed notebook keeps its outputs, so GitHub shows every figure without running
anything, and records in its metadata the SHA-256 of its code cells, its time and where it ran
(the title's "Runs in ..." line is written from that record);
tests/test_notebooks.py fails when a notebook's code differs from the code that made its
outputs. Real data is shown where the notebook finds it (data/LA_half, data/LA, data/ACDC, or
the LA_ROOT / ACDC_ROOT variables).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = "https://github.com/USER/bcp_minimal"  # the project's address: edit here, nowhere else
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLAB = "https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"

SETUP = '''# Set-up. Locally: moves to the project root so `import bcp_minimal` works, installs nothing.
# On Colab: fetches the project from REPO and installs only what Colab lacks (nibabel for NIfTI).
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = "{repo}"  # written by notebooks/build.py
if not Path("bcp_minimal.py").exists() and Path("../bcp_minimal.py").exists():
    os.chdir("..")  # opened from notebooks/: work from the project root
if "google.colab" in sys.modules and not Path("bcp_minimal.py").exists():
    if "/USER/" in REPO:
        raise RuntimeError(
            f"REPO is still the placeholder {{REPO}}: this copy of the project has no public "
            "address yet. Either set REPO above to your copy's GitHub address (and re-run), or "
            "upload the project folder in Colab's Files panel, `%cd` into it, and re-run.")
    if not Path("bcp_minimal").exists():
        subprocess.run(["git", "clone", "-q", REPO, "bcp_minimal"], check=True)
    os.chdir("bcp_minimal")
if "google.colab" in sys.modules:  # Colab has torch, numpy, scipy, matplotlib, h5py, ipywidgets
    missing = [m for m in ("nibabel", "tqdm", "h5py") if importlib.util.find_spec(m) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
sys.path.insert(0, os.getcwd())
print("project root found:", Path("bcp_minimal.py").exists())'''


def owner_repo(repo: str = REPO) -> str:
    return repo.rstrip("/").split("github.com/")[-1]


def colab_link(name: str, repo: str = REPO) -> str:
    return COLAB.format(owner_repo=owner_repo(repo), name=name)


# `pretrain_iters = 200` and friends sit on their own lines so CI (and benchmark.py's GPU check
# dry run) can shrink them.
ITERS = re.compile(r"^(\w*iters\w*) = \d+", re.M)


def shrink(source: str) -> str:
    """A code cell with every iteration literal set to 4."""
    return ITERS.sub(lambda m: f"{m.group(1)} = 4", source)


def code_hash(nb) -> str:
    """SHA-256 of the notebook's code cells, in order: what its outputs were made by."""
    text = "\n# ---- cell ----\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return hashlib.sha256(text.encode()).hexdigest()


TIMING = re.compile(r"^\*Runs in .*\*$", re.M)  # the title's time line, written from the stamp


def timing_line(seconds: float, ran_on: str) -> str:
    """The title's first line: how long the notebook took here, in words and in seconds."""
    s = round(seconds)
    when = ("under a minute" if s < 60 else "about a minute" if s < 90
            else f"about {round(s / 60)} minutes")
    measured = f"(measured by `notebooks/build.py`: {s} s, {ran_on})"
    if ran_on.startswith("CPU"):
        return f"*Runs in {when} on a laptop CPU {measured}.*"
    return f"*Runs in {when} on a GPU {measured}; longer on a laptop CPU.*"


def write_timing(nb) -> None:
    """Rewrite the title's time line from the notebook's stamp, so the two cannot disagree."""
    stamp = nb.metadata.get("bcp_minimal", {})
    if "seconds" in stamp:
        line = timing_line(stamp["seconds"], stamp.get("ran_on", "CPU"))
        nb.cells[0].source = TIMING.sub(lambda _: line, nb.cells[0].source, count=1)


def write_links(nb, name: str) -> None:
    """The set-up cell (second cell) and the Colab badge of the title cell, from REPO."""
    nb.cells[1].source = SETUP.format(repo=REPO)
    nb.cells[0].source = re.sub(r"\(https://colab\.research\.google\.com/github/[^)]*\)",
                                f"({colab_link(name)})", nb.cells[0].source)


def readme_links() -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    new = re.sub(r"https://colab\.research\.google\.com/github/[^)]*?/notebooks/([\w.]+\.ipynb)",
                 lambda m: colab_link(m.group(1)), text)
    if new != text:
        path.write_text(new)


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS")  # and how busy the machine was at the start
    threads = f", {threads} thread{'s' * (threads != '1')}" if threads else ""
    return (f"CPU {cpu}, {os.cpu_count()} cores{threads}, load {os.getloadavg()[0]:.1f}, "
            f"torch {torch.__version__}")


def build(path: Path, execute: bool = True) -> float:
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    write_links(nb, path.name)
    seconds = 0.0
    if execute:
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        t0, ran_on = time.time(), machine()
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(HERE)}}).execute()
        seconds = time.time() - t0
        nb.metadata["bcp_minimal"] = {"code_sha256": code_hash(nb), "seconds": round(seconds),
                                      "ran_on": ran_on}
    elif "bcp_minimal" in nb.metadata:
        nb.metadata["bcp_minimal"]["code_sha256"] = code_hash(nb)  # links only: same code
    write_timing(nb)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> int:
    links_only = "--links-only" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    paths = [p for p in sorted(HERE.glob("*.ipynb")) if not wanted or p.name[:2] in wanted]
    for path in paths:
        seconds = build(path, execute=not links_only)
        print(f"{path.name}: " + ("links written" if links_only else f"executed in {seconds:.0f} s"))
    readme_links()
    print(json.dumps({"repo": REPO, "notebooks": [p.name for p in paths]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
