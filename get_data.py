"""The data side of bcp_minimal: layouts, reading and writing cases and scans, normalising,
resampling, splits, the training crop sampler, and getting the real data. It imports no project
file; bcp_minimal.py imports it (the method reads no data file itself).

    python get_data.py LA --root data/LA                        # the 100 preprocessed LA cases
    python get_data.py LA_half --src data/LA --root data/LA_half --val 10  # half resolution
    python get_data.py ACDC --url URL --root data/ACDC           # ACDC from a zip you point to
    python get_data.py nifti --src Task02_Heart --root data/Heart  # your MSD / nnU-Net folder
    python get_data.py pancreas --src Pancreas-NIH --root data/Pancreas  # NIH CT (NIfTI)

LA: the preprocessed MRI of the 2018 Atrial Segmentation Challenge as the UA-MT repository
publishes it (data/ folder: 80 train + 20 test cases, about 2.7 GB, the split that UA-MT,
SSL4MIS and BCP use). Every file is checked (HDF5 signature, 'image' and 'label' of one shape)
and written through a .part file, so an interrupted download resumes where it stopped.
`--val N` holds the last N cases of train.list out as val.list (the split to choose settings
on; default 0: the paper's 80 / 20). LA_half: every axis halved (trilinear image, label =
trilinear label >= 0.5), the same lists; what `--data LA_half` (a CPU preset) trains on.
ACDC: the SSL4MIS preprocessing of the ACDC cardiac MRI (2-D training slices, volumes for
evaluation, the lists BCP uses); its authors share it as a zip on cloud drives without a stable
direct link, so this script takes the zip's URL (or unpack it yourself, see ACDC_HELP).
nifti: a Medical Segmentation Decathlon (MSD) or nnU-Net raw folder (dataset.json, imagesTr/,
labelsTr/) written as cases of the LA layout: each scan normalised (CT: HU window to [0, 1]; MR:
z-score) and resampled if asked; labeled cases first in train.list, then the unlabeled ones;
`--val K` labeled cases as val.list. Scans without a label file are unlabeled; where every scan
has one (most MSD tasks) the first `--labeled N` (default: a fifth, at least 1) keep theirs and
the rest train as unlabeled (their labels are never read). bcp_dataset.json records classes,
norm, spacing, labeled count and preset, so `python bcp_minimal.py --root OUT` needs no flag.
pancreas: the NIH Pancreas-CT as CoraNet and BCP's code/pancreas prepare it: 1 mm voxels, HU
window [-125, 275] to [0, 1], a crop around the pancreas (at least 96 voxels + 25 each side),
the last 20 cases (sorted) as test.list, the rest train.list (the paper's 62 / 20).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# 1. Layouts ----------------------------------------------------------------------------------

CASES_DIR, CASE_FILE = "2018LA_Seg_Training Set", "mri_norm2.h5"  # the official LA layout
DATASET_FILE = "bcp_dataset.json"  # this script's record of a folder it made: classes, norm..
CT_WINDOW = (-125.0, 275.0)  # HU window of the official Pancreas code (CoraNet)
NORMS = ("zscore", "minmax", "ct", "none")
LA_URL = "https://github.com/yulequan/UA-MT/raw/master/data"
GET = {"LA": "get it with `python get_data.py LA --root {}` (see README)",
       "ACDC": "get the SSL4MIS-preprocessed ACDC data with `python get_data.py ACDC --root {}`"}
ACDC_HELP = ("the SSL4MIS-preprocessed ACDC (data/slices/<slice>.h5, data/<volume>.h5, "
             "train_slices.list, val.list, test.list) is linked from github.com/HiLab-git/SSL4MIS"
             " (data/ACDC/README.md) as a zip: unzip it into {root}, or give its direct URL: "
             "`python get_data.py ACDC --url URL --root {root}`")


class UserError(Exception):
    """A problem with the user's data, flags or files: one line, no traceback, exit 2."""


def is_acdc(root):
    return (Path(root) / "train_slices.list").is_file()  # SSL4MIS layout


def case_path(root, case):
    """LA: root/2018LA_Seg_Training Set/<case>/mri_norm2.h5. ACDC: root/data/<volume>.h5 and
    root/data/slices/<slice>.h5, or every file in root/data (the flat copies)."""
    if not is_acdc(root):
        return Path(root) / CASES_DIR / case / CASE_FILE
    nested, flat = Path(root) / "data" / "slices" / f"{case}.h5", Path(root) / "data" / f"{case}.h5"
    return nested if nested.is_file() or ("_slice_" in case and not flat.is_file()) else flat


# 2. Reading cases and lists -------------------------------------------------------------------

def read_h5(path, keys=("image", "label")):
    """-> {key: array, "spacing": mm per voxel or None} of an h5 case. Missing keys are absent
    from the dict; a file h5py cannot read raises UserError naming it."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            out = {k: f[k][()] for k in keys if k in f}
            out["spacing"] = tuple(f.attrs["spacing"]) if "spacing" in f.attrs else None
            out["found"] = list(f.keys())
            return out
    except Exception as e:  # h5py raises OSError and others on truncated files
        raise UserError(f"{path}: cannot read this HDF5 file ({type(e).__name__}: {e}); it is "
                        "corrupt or truncated: re-download or re-create the case") from None


def load_case(root, case, num_classes=2, label=True):
    """One case -> (image float32, label uint8 or None), checked; every problem names the file.
    label=False (an unlabeled case): its label is never read, nor needed."""
    path = case_path(root, case)
    if not path.is_file():
        raise UserError(f"{path}: case {case!r} is in a list but has no file; remove it from "
                        "the list or restore the file" + (" (ACDC: data/slices/ or a flat data/)"
                                                          if is_acdc(root) else ""))
    want = ("image", "label")[:1 + label]
    d = read_h5(path, want)
    missing = [k for k in want if k not in d]
    if missing:
        raise UserError(f"{path}: no dataset {' or '.join(map(repr, missing))} (found "
                        f"{d['found']}); every case needs 'image', labeled and "
                        "evaluated ones 'label' (the first --labeled cases of train.list"
                        " are the labeled ones: put them first or lower --labeled)")
    image, lab = np.asarray(d["image"], np.float32), d.get("label")
    shape = image.shape if lab is None else lab.shape
    problem = (f"image shape {image.shape} and label shape {shape} must be the same 2-D "
               "or 3-D shape" if image.ndim not in (2, 3) or image.shape != shape else
               "the image holds NaN or inf values; fix the preprocessing (np.nan_to_num) or "
               "drop the case" if not np.isfinite(image).all() else
               f"label values {np.unique(lab)[:10].tolist()} but {num_classes} classes allow "
               f"0..{num_classes - 1}; fix the label map" if lab is not None and (
                   lab.min() < 0 or lab.max() >= num_classes) else None)
    if problem:
        raise UserError(f"{path}: {problem}")
    return image, None if lab is None else np.asarray(lab).astype(np.uint8)


def read_list(root, split, num_classes=2):
    """The case ids of `<split>.list`, one per line; a missing or empty list is an error."""
    lst = Path(root) / f"{split}.list"
    cases = lst.read_text().split() if lst.is_file() else []
    if not cases:
        what = "is missing or empty" if Path(root).is_dir() else f"is missing: no folder {root}"
        val = (" (val.list: make the folder with `python get_data.py ... --val N`)"
               if split == "val" else "")
        raise UserError(f"{lst} {what}{val} (the official layouts have train.list (ACDC: also "
                        "train_slices.list) and test.list, one id per line); " + GET[
                            "ACDC" if num_classes == 4 else "LA"].format(root))
    return cases


def load_split(root, split, num_classes=2, labeled=None):
    """All cases of `<split>.list` -> (case ids, images, labels), numpy arrays; with `labeled`
    only the first `labeled` labels are read, the others are None (never opened)."""
    cases = read_list(root, split, num_classes)
    n = len(cases) if labeled is None else labeled
    data = [load_case(root, c, num_classes, label=i < n) for i, c in enumerate(cases)]
    return cases, [d[0] for d in data], [d[1] for d in data]


def load_training(root, labeled, num_classes=2, patch=None, need_unlabeled=True):
    """The training split -> (labeled images, their labels, unlabeled images), numpy. LA
    layout: train.list, its first `labeled` cases labeled. ACDC: train_slices.list, the slices
    of its first `labeled` patients labeled, every slice resized to the 2-D `patch` once
    (official: at every draw). The unlabeled cases' labels are never read."""
    acdc = is_acdc(root)
    split = "train_slices" if acdc else "train"
    cases = read_list(root, split, num_classes)
    n = len(set(c.split("_")[0] for c in cases)) if acdc else len(cases)
    if labeled >= n + (not need_unlabeled):
        unit = "patients" if acdc else "cases"
        raise UserError(f"--labeled {labeled}: {root} has {n} training {unit} and BCP needs "
                        f"unlabeled ones; use --labeled {n - 1} or fewer")
    k = patients_to_slices(cases, labeled) if acdc else labeled
    _, images, labels = load_split(root, split, num_classes, labeled=k)  # labels[k:]: None
    if acdc:  # 2-D slices of many sizes
        images = [resize(torch.from_numpy(im), patch).numpy() for im in images]
        labels = [resize(torch.from_numpy(lb), patch).byte().numpy() for lb in labels[:k]]
    return images[:k], labels[:k], images[k:]


def patients_to_slices(slices, n):
    """ACDC --labeled counts patients: the slices of the first n patients of the list (BCP's
    patients_to_slices: 3 -> 68, 7 -> 136 with the official train_slices.list)."""
    patients = list(dict.fromkeys(s.split("_")[0] for s in slices))[:n]
    return sum(s.split("_")[0] in patients for s in slices)


def dataset_defaults(root):
    """-> (preset, config defaults) that this script recorded in root/bcp_dataset.json for a
    folder it made (classes, norm, window, spacing, labeled, eval split), or (None, {})."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None, {}
    try:
        d = json.loads(path.read_text())
        return d.get("preset"), dict(d["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a valid {DATASET_FILE} ({e}); re-create the folder with "
                        "get_data.py or delete the file") from None


# 3. Scans: NIfTI or h5 in, normalised and resampled as training reads them; masks out ---------

def normalize(image, norm, window=CT_WINDOW):
    """One whole scan's intensities as training expects them (float32). zscore (MR, as the LA
    preprocessing): (x - mean) / std; minmax (ACDC, SSL4MIS): to [0, 1]; ct (official Pancreas
    / CoraNet): clip to the HU window, then to [0, 1] (deviation: CoraNet divides by the
    clipped scan's own min-max, the same wherever the scan spans the window; ours is fixed);
    none: as given. Applied when a case is made here and by --predict to every NIfTI scan."""
    x = np.asarray(image, np.float64)
    if norm == "zscore":
        x = (x - x.mean()) / (x.std() + 1e-8)
    elif norm == "minmax":
        x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    elif norm == "ct":
        x = (np.clip(x, *window) - window[0]) / (window[1] - window[0])
    return x.astype(np.float32)


def resample(x, zoom, label=False):
    """A 3-D scan (numpy) resized by `zoom` per axis (old spacing / new spacing), trilinear;
    label=True: each class's indicator trilinear, then the most likely class (CoraNet: linear,
    then >= 0.5)."""
    size = [max(1, round(s * z)) for s, z in zip(x.shape, zoom)]

    def tri(v):
        v = torch.as_tensor(v, dtype=torch.float32)[None, None]
        return F.interpolate(v, size, mode="trilinear", align_corners=False)[0, 0]
    if not label:
        return tri(x).numpy()
    classes = np.unique(x)
    return classes[torch.stack([tri(x == k) for k in classes]).argmax(0).numpy()].astype(np.uint8)


def read_nifti(path, what="image"):
    """-> (3-D array, affine, header) of a NIfTI file; (X, Y, Z, 1) is read as (X, Y, Z); a
    clear error for anything else. The project's one NIfTI reader."""
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
    return data, nii.affine, nii.header


def prepare_scan(image, zooms, norm, window, spacing, path, label=None, label_path=None):
    """Check, normalise (norm, window) and resample (to `spacing` mm, if set) one raw scan and
    its label: what a case made here holds and what --predict feeds the model.
    -> (image, label, mm per voxel)."""
    if not np.isfinite(image).all():
        raise UserError(f"{path}: the image holds NaN or inf values; fix or drop the scan")
    if label is not None and label.shape != image.shape:
        raise UserError(f"{label_path}: label shape {label.shape} but {path} has shape "
                        f"{image.shape}; the label must be on the image's grid")
    image = normalize(image, norm, window)
    if spacing:
        zoom = np.array(zooms) / np.array(spacing)  # mm per voxel of the scan / of the cases
        image = resample(image, zoom)
        label = None if label is None else resample(label, zoom, label=True)
    return image, label, tuple(spacing or zooms)


def read_scan(path, norm, window=CT_WINDOW, spacing=()):
    """A scan for --predict -> (image float32 as training reads its cases, affine, header or
    None, voxel mm3 or None, the input's shape). NIfTI is raw: prepare_scan with the run's
    norm and spacing. An h5 file is a case already prepared (the LA and ACDC files): as stored
    (3-D, or ACDC's (slices, H, W))."""
    path = Path(path)
    if path.suffix == ".h5":
        d = read_h5(path, ("image",))
        if "image" not in d:
            raise UserError(f"{path}: no dataset 'image' (found {d['found']})")
        image = np.asarray(d["image"], np.float32)
        affine, header, zooms = np.eye(4), None, d["spacing"]
    else:
        image, affine, header = read_nifti(path)
        zooms = header.get_zooms()[:3]
    if image.ndim != 3:
        raise UserError(f"{path}: a {image.ndim}-D image; give one 3-D scan per file")
    shape = image.shape
    if header is not None:
        image = prepare_scan(image.astype(np.float32), zooms, norm, window, spacing, path)[0]
    elif not np.isfinite(image).all():
        raise UserError(f"{path}: the image holds NaN or inf values")
    voxel = None if zooms is None else float(np.prod(zooms))
    return image, affine, header, voxel, shape


def find_scans(source):
    """-> [(path, case name)] of the .nii/.nii.gz/.h5 scans in `source` (a file or a folder),
    sorted; nnU-Net's channel suffix _0000 is not part of the name."""
    src = Path(source)
    scans = sorted(p for p in (src.iterdir() if src.is_dir() else [src])
                   if p.name.endswith((".nii", ".nii.gz", ".h5")))
    names = [p.name.split(".")[0] for p in scans]
    return [(p, n[:-5] if n.endswith("_0000") else n) for p, n in zip(scans, names)]


def add_volumes(path, rows):
    """Append rows [case, class, voxels, mL] to the csv at path (a header first if it is new;
    mL empty where the spacing is unknown)."""
    import csv
    new = not Path(path).is_file()
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(([["case", "class", "voxels", "ml"]] if new else []) + rows)


def write_mask(path, labels, affine, header=None):
    """Labels (uint8) as a NIfTI file with the input scan's affine and header."""
    import nibabel as nib
    mask = nib.Nifti1Image(labels.astype(np.uint8), affine, header)
    mask.set_data_dtype(np.uint8)  # the input's header, but integer labels
    nib.save(mask, str(path))


def write_case(root, case, image, label, spacing=None):
    """One case of the LA layout, through a .part file: image float32, label uint8 (None: an
    unlabeled case, no label dataset at all), the voxel size in mm as an attribute."""
    import h5py
    out = case_path(root, case)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(f"{out}.part", "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
        if spacing is not None:
            f.attrs["spacing"] = spacing
    os.replace(f"{out}.part", out)


# 4. Checkpoints of training runs, written atomically ------------------------------------------

def save_checkpoint(path, state):
    """A training run's checkpoint (bcp_minimal's Run.state()), atomic: a temporary file in
    the same folder, flushed to disk, then renamed, so a killed run never leaves half a file."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, hint="give a checkpoint file of a run folder"):
    """-> the checkpoint dict at path; UserError for a missing, truncated or foreign file."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no checkpoint there; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:99]})"
                        "; it is truncated or foreign: use ckpt_last.pt, pretrain.pt or final.pt"
                        " of a run folder") from None
    if not isinstance(state, dict) or state.get("format") != "bcp_minimal/1":
        raise UserError(f"{path}: not a bcp_minimal checkpoint (no 'format': 'bcp_minimal/1')")
    return state


# 5. Training crops: the official augmentations, on volumes held on the device ----------------

MEMORY_FORMAT = {2: torch.channels_last, 3: torch.channels_last_3d}  # 1.5x faster CPU convs


def resize(x, size):
    """An image or label resized to `size`, nearest neighbour. Deviation: official ACDC uses
    scipy's zoom(order=0), which rounds some positions to the neighbouring source pixel."""
    return F.interpolate(x[None, None].float(), size=tuple(size), mode="nearest")[0, 0]


def rotate_nearest(v, degrees):
    """v (X, Y, *rest) turned by `degrees` in (X, Y) about its centre, nearest neighbour, zeros
    outside: scipy.ndimage.rotate(v, degrees, order=0, reshape=False), as official ACDC."""
    a, (X, Y) = math.radians(degrees), v.shape[:2]
    theta = torch.tensor([[[math.cos(a), -math.sin(a) * X / Y, 0],  # grid_sample's coordinates
                           [math.sin(a) * Y / X, math.cos(a), 0]]], device=v.device)  # are (y, x)
    x = v.reshape(X, Y, -1).permute(2, 0, 1)[None].float()  # (1, rest, X, Y)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, "nearest", "zeros", align_corners=False)  # (1, rest, X, Y)
    return out[0].permute(1, 2, 0).reshape(v.shape).to(v.dtype)


class VolumeSampler:
    """Training crops of volumes (or slices) held on the device, with the official LA
    augmentation: a random 90-degree rotation in (x, y), a flip along x or y, a random crop.
    Padding (3-D, official RandomCrop): if a side is <= the patch's, every side gets
    max((patch - side) // 2 + 3, 0) zeros at both ends, so a crop moves up to 6 voxels even
    along LA_half's 44 slices (patch 48); `margin=0` (2-D) pads just to the patch. `queue`: the
    rest of the current pass. labels=None: unlabeled, none held. rotate=R > 0 (ACDC presets:
    20): the official ACDC augmentation instead, see pose()."""

    def __init__(self, images, labels, patch, device, generator, margin=None, rotate=0):
        self.patch, self.g, self.queue, self.rotate = tuple(patch), generator, [], rotate
        margin = (3 if len(patch) == 3 else 0) if margin is None else margin
        side = max(patch[:2])  # a rotation swaps x and y: pad both to the larger side
        target, self.images = (side, side, *patch[2:]), []
        self.labels = None if labels is None else []
        for n, im in enumerate(images):
            if margin and any(s <= t for s, t in zip(im.shape, target)):  # official RandomCrop
                pad = [(max((t - s) // 2 + margin, 0),) * 2 for t, s in zip(target, im.shape)]
            else:  # just enough for the crop
                pad = [((t - s) // 2, t - s - (t - s) // 2) if s < t else (0, 0)
                       for t, s in zip(target, im.shape)]
            self.images.append(torch.from_numpy(np.pad(im, pad)).to(device))
            if labels is not None:
                self.labels.append(torch.from_numpy(np.pad(labels[n], pad)).to(device))

    def randint(self, high):
        return int(torch.randint(0, high, (1,), generator=self.g))

    def pose(self):
        """-> (quarter turns k, flip axis or None, angle in degrees) of one draw. rotate = 0:
        official LA RandomRotFlip, a turn and a flip every draw. rotate = R: official ACDC
        RandomGenerator, a turn and a flip half the time, else half the time a rotation by an
        integer angle in [-R, R) (R = 20), else as is (ACDC val 0.661 -> 0.765: docs/choices.md)."""
        if not self.rotate or self.randint(2):
            return self.randint(4), self.randint(2), 0
        return 0, None, self.randint(2 * self.rotate) - self.rotate if self.randint(2) else 0

    def sample(self, i):
        """-> (image, label) crops of the patch's shape (label None where none is held)."""
        k, flip, angle = self.pose()
        p = self.patch
        size = (p[1], p[0], *p[2:]) if k % 2 else p  # the crop before the rotation
        # corner in [0, s - c]. Deviation: official RandomCrop draws from [0, s - c), never
        # ending a crop at the far border (measured on the phantoms: docs/choices.md)
        corner = [self.randint(s - c + 1) for s, c in zip(self.images[i].shape, size)]
        crop = tuple(slice(a, a + c) for a, c in zip(corner, size))

        def posed(v):  # the same draw for image and label: a turn, then a rotation or a flip
            if v is None:
                return None
            v = torch.rot90(v[crop], k, (0, 1))
            if angle:
                return rotate_nearest(v, angle)
            return v if flip is None else v.flip(flip)
        return posed(self.images[i]), posed(self.labels and self.labels[i])

    def batch(self, indices):
        """-> images (B, 1, *patch) float, labels (B, *patch) long (None: unlabeled)."""
        images, labels = zip(*[self.sample(i) for i in indices])
        x = torch.stack(images)[:, None].contiguous(memory_format=MEMORY_FORMAT[len(self.patch)])
        return x, None if self.labels is None else torch.stack(labels).long()

    def draw(self, n):
        """n case indices, each pass over the cases in a fresh random order (an epoch). The
        rest of a pass carries over to the next call, so with a labeled count that is not a
        multiple of n (or smaller than n) one batch can hold a case twice."""
        out = []
        while len(out) < n:
            self.queue = self.queue or torch.randperm(len(self.images), generator=self.g).tolist()
            out.append(self.queue.pop())
        return out


# 6. Getting the data: download, convert, split -------------------------------------------------

def _valid_case_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                return False
        import h5py
        with h5py.File(path, "r") as f:  # the shapes only: no data read
            return "image" in f and "label" in f and f["image"].shape == f["label"].shape
    except Exception:  # h5py raises OSError and others on truncated files
        return False


def hold_out(root, n):
    """The last n cases of root/train.list -> root/val.list (train.list keeps the rest)."""
    if not n:
        return
    train = read_list(root, "train")
    if n >= len(train):
        raise UserError(f"--val {n}: {root}/train.list has {len(train)} cases; keep some to "
                        "train on")
    (Path(root) / "train.list").write_text("".join(f"{c}\n" for c in train[:-n]))
    (Path(root) / "val.list").write_text("".join(f"{c}\n" for c in train[-n:]))


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
        dest = case_path(root, case)
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
    """Write every case of src's lists at half resolution into dst: image and label resized to
    floor(s / 2) per axis with trilinear interpolation (align_corners=False), the label
    thresholded at 0.5."""
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    names = [n for n in ("train.list", "val.list", "test.list") if (src / n).is_file()]
    if not names:
        raise UserError(f"{src}: no train.list or test.list; get the full-size data first "
                        f"with `python get_data.py LA --root {src}`")
    cases = [c for n in names for c in (src / n).read_text().split()]
    for case in tqdm(cases, desc="LA -> LA_half", disable=not progress):
        out = case_path(dst, case)
        if out.is_file() and _valid_case_file(out):
            continue
        d = read_h5(case_path(src, case))
        size = [s // 2 for s in d["image"].shape]
        image, label = (F.interpolate(torch.from_numpy(v.astype(np.float32))[None, None],
                                      size=size, mode="trilinear", align_corners=False)[0, 0]
                        .numpy() for v in (d["image"], d["label"]))
        write_case(dst, case, image, label >= 0.5)
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


def convert_nifti(src, root, spacing=None, val=0, norm=None, window=CT_WINDOW,
                  preset="LA_half", labeled=None, progress=True):
    """An MSD / nnU-Net raw folder -> the LA layout in root (see the module docstring)."""
    from tqdm.auto import tqdm

    cases, names, modality = msd_folder(src)
    norm = norm or ("ct" if "CT" in modality.upper() else "zscore")
    with_label = [c for c, (_, lab) in cases.items() if lab is not None]
    if val >= len(with_label):
        raise UserError(f"--val {val}: {src} has {len(with_label)} labeled cases; keep some to "
                        "train on")
    train_lab = with_label[:len(with_label) - val]  # the rest of with_label: val.list
    unlabeled = [c for c in cases if cases[c][1] is None]
    if labeled is None:  # every scan labeled (most MSD tasks): a fifth keep their labels
        labeled = len(train_lab) if unlabeled else max(1, len(train_lab) // 5)
        if not unlabeled:
            print(f"every training scan of {src} has a label: the first {labeled} of "
                  f"{len(train_lab)} train as labeled, the rest as unlabeled (--labeled N)")
    if not 1 <= labeled <= len(train_lab) or labeled == len(train_lab) and not unlabeled:
        raise UserError(f"--labeled {labeled}: {src} has {len(train_lab)} labeled training "
                        f"scans and {len(unlabeled)} unlabeled; BCP needs both")
    for case, (image_path, label_path) in tqdm(cases.items(), "nifti -> h5", disable=not progress):
        image, _, header = read_nifti(image_path)
        label = None if label_path is None else read_nifti(label_path, "label")[0]
        if label is not None and (label.min() < 0 or label.max() > len(names)):
            raise UserError(f"{label_path}: label values {np.unique(label)[:10].tolist()} but "
                            f"dataset.json names {len(names) + 1} classes (0..{len(names)})")
        image, label, mm = prepare_scan(image.astype(np.float32), header.get_zooms()[:3], norm,
                                        window, spacing, image_path, label, label_path)
        write_case(root, case, image, label, mm)
    write_folder(root, train_lab + unlabeled, with_label[len(train_lab):], [], names, norm,
                 window, spacing, preset, labeled)
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
        image, _, header = read_nifti(scans[case])
        label = (read_nifti(labels[case[-4:]], "label")[0] > 0).astype(np.uint8)
        image, label, mm = prepare_scan(image.astype(np.float32), header.get_zooms()[:3], "ct",
                                        CT_WINDOW, (1.0, 1.0, 1.0), scans[case], label,
                                        labels[case[-4:]])
        if not label.any():
            raise UserError(f"{labels[case[-4:]]}: an empty pancreas label; check the file")
        write_case(root, case, *crop_to_organ(image, label), mm)
    train, test = cases[:len(cases) - n_test], cases[len(cases) - n_test:]
    write_folder(root, train[:len(train) - val], train[len(train) - val:], test, ["pancreas"],
                 "ct", CT_WINDOW, (1.0, 1.0, 1.0), "Pancreas", 12)
    return Path(root)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["LA", "LA_half", "ACDC", "nifti", "pancreas"])
    p.add_argument("--root", help="where to write (default data/<what>)")
    p.add_argument("--src", default="data/LA", help="LA_half: the full-size LA data; nifti: "
                   "the MSD / nnU-Net folder; pancreas: the NIH Pancreas-CT NIfTI scans + labels")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="nifti: resample every scan to this voxel size in mm (default: keep)")
    p.add_argument("--val", type=int, default=0, help="labeled cases held out as val.list, the "
                   "split to choose settings on (LA, LA_half: the last N of train.list)")
    p.add_argument("--labeled", type=int, help="nifti: labeled scans that train as labeled "
                   "(default: all; a fifth where every scan has a label)")
    p.add_argument("--norm", choices=list(NORMS),
                   help="nifti: default from dataset.json's modality, CT -> ct, else zscore")
    p.add_argument("--window", type=float, nargs=2, default=CT_WINDOW,
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
            hold_out(root, a.val)
        elif a.what == "ACDC":
            if not a.url:
                raise UserError(f"{root}: " + ACDC_HELP.format(root=root))
            download_acdc(root, a.url)
        elif a.what == "nifti":
            convert_nifti(a.src, root, a.spacing, a.val, a.norm, tuple(a.window), a.preset,
                          a.labeled)
        elif a.what == "pancreas":
            convert_pancreas(a.src, root, val=a.val)
        else:
            make_half(a.src, root)
            hold_out(root, a.val)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.what} data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
