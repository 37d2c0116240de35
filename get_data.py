"""Getting the real data for bcp_minimal (not the method: bcp_minimal.py does not need it to
train on data that is already on disk).

    python get_data.py LA --root data/LA                        # the 100 preprocessed LA cases
    python get_data.py LA_half --src data/LA --root data/LA_half  # the same at half resolution
    python get_data.py ACDC --url URL --root data/ACDC           # ACDC from a zip you point to

LA: the preprocessed MRI of the 2018 Atrial Segmentation Challenge as the UA-MT repository
publishes it (data/ folder: 80 train + 20 test cases, about 2.7 GB, the split that UA-MT,
SSL4MIS and BCP use). Every file is checked (HDF5 signature, 'image' and 'label' of one shape)
and written through a .part file, so an interrupted download resumes where it stopped.
LA_half: every axis halved (trilinear image, label = trilinear label >= 0.5), the same lists;
what `--data LA_half` (a CPU preset) trains on.
ACDC: the SSL4MIS preprocessing of the ACDC cardiac MRI (2-D training slices, volumes for
evaluation, the lists BCP uses); its authors share it as a zip on cloud drives without a stable
direct link, so this script takes the zip's URL (or unpack it yourself, see ACDC_HELP).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from bcp_minimal import CASE_FILE, CASES_DIR, UserError

LA_URL = "https://github.com/yulequan/UA-MT/raw/master/data"


def _valid_case_file(path: Path) -> bool:
    import h5py

    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                return False
        with h5py.File(path, "r") as f:
            return "image" in f and "label" in f and f["image"].shape == f["label"].shape
    except Exception:
        return False


def download_la(root, base_url: str = LA_URL, progress: bool = True, timeout: float = 60) -> Path:
    """Fetch the 100 preprocessed LA cases and train/test lists into root (resumable).

    Files already complete are skipped; each download goes to a .part file that is checked
    (HDF5 signature, 'image' and 'label' of one shape) and renamed only when good.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    from tqdm.auto import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def fetch(rel: str, dest: Path) -> None:
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(rel)}"
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            raise UserError(f"download {url}: HTTP {e.code}; the mirror may have moved, "
                            "pass another mirror with --url") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise UserError(f"download {url}: cannot connect ({getattr(e, 'reason', e)}); are you "
                            "offline? Re-run later: finished files are kept") from None
        os.replace(tmp, dest)

    lists = {}
    for name in ("train.list", "test.list"):
        fetch(name, root / name)
        lists[name] = (root / name).read_text().split()
    cases = lists["train.list"] + lists["test.list"]
    for case in tqdm(cases, desc="LA cases", disable=not progress):
        dest = root / CASES_DIR / case / CASE_FILE
        if dest.is_file() and _valid_case_file(dest):
            continue  # already complete
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(f"{CASES_DIR}/{case}/{CASE_FILE}", dest)
        if not _valid_case_file(dest):
            dest.unlink()
            raise UserError(f"{dest}: downloaded file is not a valid LA case (HDF5 with 'image' "
                            "and 'label'); removed it, re-run to try again")
    return root


def make_half(src, dst, progress=True) -> Path:
    """Write every case of src's train.list and test.list at half resolution into dst:
    image and label resized to floor(s / 2) per axis with trilinear interpolation
    (align_corners=False), the label thresholded at 0.5."""
    import h5py
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    names = [n for n in ("train.list", "test.list") if (src / n).is_file()]
    if not names:
        raise UserError(f"{src}: no train.list or test.list; get the full-size data first "
                        f"with `python get_data.py LA --root {src}`")
    cases = [c for n in names for c in (src / n).read_text().split()]
    for case in tqdm(cases, desc="LA -> LA_half", disable=not progress):
        out = dst / CASES_DIR / case / CASE_FILE
        if out.is_file() and _valid_case_file(out):
            continue
        with h5py.File(src / CASES_DIR / case / CASE_FILE, "r") as f:
            image, label = f["image"][()].astype(np.float32), f["label"][()].astype(np.float32)
        size = [s // 2 for s in image.shape]
        half = [F.interpolate(torch.from_numpy(v)[None, None], size=size, mode="trilinear",
                              align_corners=False)[0, 0].numpy() for v in (image, label)]
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(f"{out}.part", "w") as f:
            f.create_dataset("image", data=half[0].astype(np.float32))
            f.create_dataset("label", data=(half[1] >= 0.5).astype(np.uint8))
        os.replace(f"{out}.part", out)
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def prepare(preset, root, url=LA_URL):
    """Fetch what `--data preset` needs into root (LA_half: via data/LA beside root)."""
    if preset == "LA":
        print(f"{root} is missing: downloading the preprocessed LA data (100 cases)")
        return download_la(root, url)
    if preset == "LA_half":
        full = Path(root).parent / "LA"
        if not (full / "train.list").is_file():
            prepare("LA", full, url)
        print(f"{root} is missing: writing LA at half resolution from {full}")
        return make_half(full, root)
    if preset.startswith("ACDC"):
        raise UserError(f"{root} is missing; " + ACDC_HELP.format(root=root))
    raise UserError(f"--data {preset}: nothing to download")


ACDC_HELP = ("the SSL4MIS-preprocessed ACDC (data/slices/<slice>.h5, data/<volume>.h5, "
             "train_slices.list, val.list, test.list) is linked from github.com/HiLab-git/SSL4MIS"
             " (data/ACDC/README.md) as a zip: unzip it into {root}, or give its direct URL: "
             "`python get_data.py ACDC --url URL --root {root}`")


def download_acdc(root, url, timeout=60) -> Path:
    """Fetch a zip of the SSL4MIS ACDC folder from url (through a .part file), unpack it into
    root (the folder holding train_slices.list may be nested in the zip) and check the layout."""
    import urllib.error
    import urllib.request
    import zipfile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    zpath = root / "acdc.zip"
    if not zpath.is_file():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                with open(f"{zpath}.part", "wb") as f:
                    shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"download {url}: {getattr(e, 'reason', e)}; " + ACDC_HELP.format(
                root=root)) from None
        os.replace(f"{zpath}.part", zpath)
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(root / "unpacked")
    except zipfile.BadZipFile:
        zpath.unlink()
        raise UserError(f"{url}: not a zip file (removed); "
                        + ACDC_HELP.format(root=root)) from None
    lists = sorted((root / "unpacked").rglob("train_slices.list"))
    if not lists:
        raise UserError(f"{zpath}: no train_slices.list inside; " + ACDC_HELP.format(root=root))
    for item in lists[0].parent.iterdir():
        os.replace(item, root / item.name)
    shutil.rmtree(root / "unpacked")
    zpath.unlink()
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["LA", "LA_half", "ACDC"])
    p.add_argument("--root", help="where to write (default data/LA or data/LA_half)")
    p.add_argument("--src", default="data/LA", help="LA_half: the full-size LA data")
    p.add_argument("--url", help="LA: a mirror of the UA-MT data/ folder (default: UA-MT's own); "
                   "ACDC: the direct URL of a zip of the SSL4MIS ACDC folder")
    a = p.parse_args(argv)
    root = a.root or f"data/{a.what}"
    try:
        if a.what == "LA":
            download_la(root, a.url or LA_URL)
        elif a.what == "ACDC":
            if not a.url:
                raise UserError(f"{root}: " + ACDC_HELP.format(root=root))
            download_acdc(root, a.url)
        else:
            make_half(a.src, root)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.what} data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
