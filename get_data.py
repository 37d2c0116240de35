"""Getting the real data for bcp_minimal (not the method: bcp_minimal.py does not need it to
train on data that is already on disk).

    python get_data.py LA --root data/LA                        # the 100 preprocessed LA cases
    python get_data.py LA_half --src data/LA --root data/LA_half  # the same at half resolution
    python get_data.py ACDC --url URL --root data/ACDC           # ACDC from a zip you point to
    python get_data.py nifti --src Task02_Heart --root data/Heart  # your MSD / nnU-Net folder
    python get_data.py pancreas --src Pancreas-NIH --root data/Pancreas  # NIH CT (NIfTI)

LA: the preprocessed MRI of the 2018 Atrial Segmentation Challenge as the UA-MT repository
publishes it (data/ folder: 80 train + 20 test cases, about 2.7 GB, the split that UA-MT,
SSL4MIS and BCP use). Every file is checked (HDF5 signature, 'image' and 'label' of one shape)
and written through a .part file, so an interrupted download resumes where it stopped.
LA_half: every axis halved (trilinear image, label = trilinear label >= 0.5), the same lists;
what `--data LA_half` (a CPU preset) trains on.
ACDC: the SSL4MIS preprocessing of the ACDC cardiac MRI (2-D training slices, volumes for
evaluation, the lists BCP uses); its authors share it as a zip on cloud drives without a stable
direct link, so this script takes the zip's URL (or unpack it yourself, see ACDC_HELP).
nifti: a Medical Segmentation Decathlon or nnU-Net raw folder (dataset.json, imagesTr/, labelsTr/,
imagesTs/) written as cases of the LA layout: each scan normalised (CT: HU window to [0, 1]; MR:
z-score) and resampled if asked, labeled cases first in train.list, then the scans without a
label file (unlabeled), K labeled cases as val.list; bcp_dataset.json records classes, norm,
spacing and preset, so `python bcp_minimal.py --root OUT` needs no other flag.
pancreas: the NIH Pancreas-CT as CoraNet and BCP's code/pancreas prepare it: 1 mm voxels, HU
window [-125, 275] to [0, 1], a crop around the pancreas (at least 96 voxels + 25 each side),
the last 20 cases (sorted) as test.list, the rest train.list (the paper's 62 / 20).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from bcp_minimal import CASE_FILE, CASES_DIR, DATASET_FILE, UserError, normalize, resample

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


def read_nifti(path, what="image"):
    """-> (3-D array, mm per voxel) of a NIfTI file; a clear error for anything else."""
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.dataobj)
    except Exception as e:
        raise UserError(f"{path}: cannot read this NIfTI {what} ({type(e).__name__}: "
                        f"{e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: a {data.ndim}-D {what} of shape {data.shape}; bcp_minimal "
                        "trains on one 3-D channel per scan: split the channels into "
                        "<case>_0000.nii.gz, <case>_0001.nii.gz.. (nnU-Net) and keep _0000")
    return data, tuple(float(z) for z in nii.header.get_zooms()[:3])


def write_case(root, case, image, label, spacing):
    """One case of the LA layout, through a .part file: image float32, label uint8 (None: an
    unlabeled case, no label dataset at all), the voxel size in mm as an attribute."""
    import h5py

    out = Path(root) / CASES_DIR / case / CASE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(f"{out}.part", "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
        f.attrs["spacing"] = spacing
    os.replace(f"{out}.part", out)


def prepare_scan(image, label, zooms, norm, window, spacing, path, label_path=None):
    """Normalise (the run's function, as --predict applies it) and resample one scan."""
    if not np.isfinite(image).all():
        raise UserError(f"{path}: the image holds NaN or inf values; fix or drop the scan")
    if label is not None and label.shape != image.shape:
        raise UserError(f"{label_path}: label shape {label.shape} but {path} has shape "
                        f"{image.shape}; the label must be on the image's grid")
    image = normalize(image, norm, window)
    if spacing:
        zoom = np.array(zooms) / np.array(spacing)
        image = resample(image, zoom)
        label = None if label is None else resample(label, zoom, label=True)
    return image, label, tuple(spacing or zooms)


def msd_folder(src):
    """-> ({case: (image path, label path or None)}, class names, modality) of an MSD or
    nnU-Net raw folder; scans of imagesTr without a label file are the unlabeled ones."""
    src = Path(src)
    meta_path = src / "dataset.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: an MSD / nnU-Net folder holds dataset.json "
                        '(e.g. {"labels": {"0": "background", "1": "organ"}, "modality": {"0":'
                        ' "MRI"}}), imagesTr/ and labelsTr/')
    meta = json.loads(meta_path.read_text())
    labels = meta.get("labels", {})
    try:  # MSD {"0": "background", "1": "organ"}; nnU-Net v2 {"background": 0, "organ": 1}
        index = ({int(k): v for k, v in labels.items()} if all(k.isdigit() for k in labels)
                 else {int(v): k for k, v in labels.items()})
    except (TypeError, ValueError):
        raise UserError(f"{meta_path}: 'labels' must map class numbers and names, found "
                        f"{labels}") from None
    if sorted(index) != list(range(len(index))) or len(index) < 2:
        raise UserError(f"{meta_path}: 'labels' must number the classes 0..K-1, background 0 "
                        f"and at least one more; found {sorted(index)}")
    modality = " ".join(map(str, (meta.get("modality") or meta.get("channel_names") or
                                  {"0": "MRI"}).values()))
    cases = {}
    for path in sorted((src / "imagesTr").glob("*.nii*")):
        name = path.name.split(".nii")[0]
        if name.startswith(".") or (name[-5:-4] == "_" and name[-4:].isdigit() and
                                    name[-4:] != "0000"):
            continue  # macOS '._' copies (found in MSD tars); channels after the first
        case = name[:-5] if name.endswith("_0000") else name
        label = [p for p in (src / "labelsTr" / f"{case}.nii.gz", src / "labelsTr" /
                             f"{case}.nii") if p.is_file()]
        cases[case] = (path, label[0] if label else None)
    if not cases:
        raise UserError(f"{src / 'imagesTr'}: no <case>.nii.gz or <case>_0000.nii.gz scans")
    return cases, [index[k] for k in range(1, len(index))], modality


def write_folder(root, train, val, test, names, norm, window, spacing, preset, n_labeled):
    """The lists and bcp_dataset.json of a folder made here."""
    root = Path(root)
    for name, cases in (("train", train), ("val", val), ("test", test)):
        if cases:
            (root / f"{name}.list").write_text("".join(f"{c}\n" for c in cases))
    config = dict(num_classes=len(names) + 1, class_names=names, norm=norm, window=list(window),
                  spacing=list(spacing or []), labeled=n_labeled, out=f"runs/{root.name}",
                  eval_split="val" if val else "test" if test else "none")
    (root / DATASET_FILE).write_text(json.dumps({"preset": preset, "config": config}, indent=2))


def convert_nifti(src, root, spacing=None, val=0, norm=None, window=(-125.0, 275.0),
                  preset="LA_half", progress=True):
    """An MSD / nnU-Net raw folder -> the LA layout in root (see the module docstring)."""
    from tqdm.auto import tqdm

    cases, names, modality = msd_folder(src)
    norm = norm or ("ct" if "CT" in modality.upper() else "zscore")
    labeled = [c for c, (_, lab) in cases.items() if lab is not None]
    if val >= len(labeled):
        raise UserError(f"--val {val}: {src} has {len(labeled)} labeled cases; keep some to "
                        "train on")
    for case, (image_path, label_path) in tqdm(cases.items(), "nifti -> h5", disable=not progress):
        image, zooms = read_nifti(image_path)
        label = None if label_path is None else read_nifti(label_path, "label")[0]
        if label is not None and (label.min() < 0 or label.max() > len(names)):
            raise UserError(f"{label_path}: label values {np.unique(label)[:10].tolist()} but "
                            f"dataset.json names {len(names) + 1} classes (0..{len(names)})")
        image, label, mm = prepare_scan(image, label, zooms, norm, window, spacing, image_path,
                                        label_path)
        write_case(root, case, image, label, mm)
    train = labeled[:len(labeled) - val] + [c for c in cases if cases[c][1] is None]
    write_folder(root, train, labeled[len(labeled) - val:], [], names, norm, window, spacing,
                 preset, len(labeled) - val)
    return Path(root)


def crop_to_organ(image, label, size=96, margin=25):
    """CoraNet's crop: the label's bounding box, grown to at least `size` per axis, plus
    `margin` voxels on each side (clipped at the scan's border)."""
    box = []
    for axis, n in enumerate(label.shape):
        idx = np.nonzero(label.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lo, hi = idx.min(), idx.max()
        grow = max(size - (hi - lo), 0) // 2 + margin
        box.append(slice(max(lo - grow, 0), min(hi + grow, n)))
    return image[tuple(box)], label[tuple(box)]


def convert_pancreas(src, root, n_test=20, val=0, progress=True):
    """NIH Pancreas-CT (NIfTI scans PANCREAS_0001.nii.gz.. and TCIA labels label0001.nii.gz..,
    anywhere under src) -> the LA layout in root, prepared as CoraNet (module docstring)."""
    from tqdm.auto import tqdm

    src = Path(src)
    scans = {p.name.split(".nii")[0]: p for p in src.rglob("PANCREAS_*.nii*")}
    labels = {p.name[5:9]: p for p in src.rglob("label*.nii*")}
    if not scans:
        raise UserError(f"{src}: no PANCREAS_NNNN.nii.gz scans. The TCIA release is DICOM: "
                        "convert each series to PANCREAS_NNNN.nii.gz first (e.g. `dcm2niix -z y"
                        " -f PANCREAS_0001 <series folder>`), beside the TCIA labels "
                        "label0001.nii.gz")
    cases = sorted(scans)
    missing = [c for c in cases if c[-4:] not in labels]
    if missing:
        raise UserError(f"{scans[missing[0]]}: no label{missing[0][-4:]}.nii.gz under {src} "
                        f"({len(missing)} scans without one); put the TCIA labels beside the scans")
    if n_test + val + 2 > len(cases):
        raise UserError(f"{src}: {len(cases)} cases; too few for {n_test} test and {val} val")
    for case in tqdm(cases, "pancreas -> h5", disable=not progress):
        image, zooms = read_nifti(scans[case])
        label = (read_nifti(labels[case[-4:]], "label")[0] > 0).astype(np.uint8)
        image, label, mm = prepare_scan(image, label, zooms, "ct", (-125.0, 275.0),
                                        (1.0, 1.0, 1.0), scans[case], labels[case[-4:]])
        if not label.any():
            raise UserError(f"{labels[case[-4:]]}: an empty pancreas label; check the file")
        write_case(root, case, *crop_to_organ(image, label), mm)
    train, test = cases[:len(cases) - n_test], cases[len(cases) - n_test:]
    write_folder(root, train[:len(train) - val], train[len(train) - val:], test, ["pancreas"],
                 "ct", (-125.0, 275.0), (1.0, 1.0, 1.0), "Pancreas", 12)
    return Path(root)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["LA", "LA_half", "ACDC", "nifti", "pancreas"])
    p.add_argument("--root", help="where to write (default data/<what>)")
    p.add_argument("--src", default="data/LA", help="LA_half: the full-size LA data; nifti: "
                   "the MSD / nnU-Net folder; pancreas: the NIH Pancreas-CT NIfTI scans + labels")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="nifti: resample every scan to this voxel size in mm (default: keep)")
    p.add_argument("--val", type=int, default=0, help="nifti, pancreas: labeled cases held out "
                   "as val.list (the split to choose settings on)")
    p.add_argument("--norm", choices=["zscore", "ct", "minmax", "none"],
                   help="nifti: default from dataset.json's modality, CT -> ct, else zscore")
    p.add_argument("--window", type=float, nargs=2, default=(-125.0, 275.0),
                   metavar=("LOW", "HIGH"), help="nifti --norm ct: the HU window")
    p.add_argument("--preset", default="LA_half", help="nifti: the bcp_minimal preset whose "
                   "settings (patch, iterations..) a run on this folder starts from")
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
        elif a.what == "nifti":
            convert_nifti(a.src, root, a.spacing, a.val, a.norm, tuple(a.window), a.preset)
        elif a.what == "pancreas":
            convert_pancreas(a.src, root, val=a.val)
        else:
            make_half(a.src, root)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.what} data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
