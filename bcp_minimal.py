"""bcp_minimal: Bidirectional Copy-Paste (BCP) for semi-supervised segmentation, LA 3-D, ACDC 2-D.

Yunhao Bai, Duowen Chen, Qingli Li, Wei Shen, Yan Wang, "Bidirectional Copy-Paste for
Semi-Supervised Medical Image Segmentation", CVPR 2023 (arXiv 2305.00673). Official code:
github.com/DeepMed-Lab-ECNU/BCP (one script per data set: LA_BCP_train.py, ACDC_BCP_train.py).

A Mean-Teacher (an EMA of the student) predicts pseudo-labels P_u for unlabeled scans. A mask
M (0 in a box covering beta = 2/3 of each axis, 1 elsewhere) copy-pastes a labeled scan X_l
and an unlabeled scan X_u into each other, in both directions (paper Eq. 1-2):

    X_in  = X_l * M + X_u * (1 - M)     an unlabeled box inside a labeled scan
    X_out = X_u * M + X_l * (1 - M)     a labeled box inside an unlabeled scan

Labels are mixed the same way from ground truth Y_l and pseudo-labels P_u; the loss (Eq. 6-9)
weighs the ground-truth region of each mix 1 and its pseudo-labeled region alpha = 0.5.
Helpers beside this file, not the method: get_data.py, plots.py, data_samples/make_samples.py.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. The network: a plain U-Net (the paper: V-Net; BCP works with any encoder-decoder) -------

class ConvBlock(nn.Sequential):  # (conv 3^d -> BatchNorm -> ReLU) x n
    def __init__(self, cin, cout, dims, n=2):
        Conv, Norm = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        super().__init__(*[layer for i in range(n) for layer in (
            Conv(cout if i else cin, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(True))])

class UNet(nn.Module):
    """U-Net, 4 poolings, widths w..16w: (B, C, *S) -> logits (B, K, *S); sides divide by 16.
    Deviations: official LA uses a V-Net, whose channel dropout (p 0.5) `dropout` puts on the same
    two places (bottleneck, last features); official ACDC's UNet_2d has LeakyReLU, bilinear
    upsampling and encoder dropout 0.05-0.5 (ACDC presets: none; measured in docs/choices.md).
    Two V-Net-like options make it cheaper on a CPU (docs/choices.md):
    top_convs=1: one convolution, not two, in each full-resolution block (enc0, dec0), the level
    that costs most; skip="add": each decoder block gets encoder + upsampled features summed, as
    the V-Net's skips, not concatenated: its first convolution takes half the channels."""

    def __init__(self, in_channels=1, num_classes=2, width=16, dims=3, dropout=0.0, top_convs=2,
                 skip="concat"):
        super().__init__()
        self.add = {"concat": False, "add": True}[skip]
        m = 1 if self.add else 2  # a decoder block's input: m * its width
        self.drop = (nn.Dropout3d if dims == 3 else nn.Dropout2d)(dropout)
        c = [width * 2**i for i in range(5)]  # [w, 2w, 4w, 8w, 16w]
        Up = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.pool = nn.MaxPool3d(2) if dims == 3 else nn.MaxPool2d(2)
        self.enc0 = ConvBlock(in_channels, c[0], dims, top_convs)
        self.enc1 = ConvBlock(c[0], c[1], dims)
        self.enc2, self.enc3 = ConvBlock(c[1], c[2], dims), ConvBlock(c[2], c[3], dims)
        self.enc4 = ConvBlock(c[3], c[4], dims)  # the bottleneck
        self.up4, self.dec3 = Up(c[4], c[3], 2, stride=2), ConvBlock(m * c[3], c[3], dims)
        self.up3, self.dec2 = Up(c[3], c[2], 2, stride=2), ConvBlock(m * c[2], c[2], dims)
        self.up2, self.dec1 = Up(c[2], c[1], 2, stride=2), ConvBlock(m * c[1], c[1], dims)
        self.up1 = Up(c[1], c[0], 2, stride=2)
        self.dec0 = ConvBlock(m * c[0], c[0], dims, top_convs)
        self.head = (nn.Conv3d if dims == 3 else nn.Conv2d)(c[0], num_classes, 1)

    def forward(self, x):
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"UNet input {tuple(x.shape[2:])}: each side must divide by 16")
        x0 = self.enc0(x)  # (B, w, S)
        x1 = self.enc1(self.pool(x0))  # (B, 2w, S/2)
        x2 = self.enc2(self.pool(x1))  # (B, 4w, S/4)
        x3 = self.enc3(self.pool(x2))  # (B, 8w, S/8)
        x4 = self.drop(self.enc4(self.pool(x3)))  # (B, 16w, S/16)
        u3 = self.dec3(self.join(x3, self.up4(x4)))  # (B, 8w, S/8)
        u2 = self.dec2(self.join(x2, self.up3(u3)))  # (B, 4w, S/4)
        u1 = self.dec1(self.join(x1, self.up2(u2)))  # (B, 2w, S/2)
        u0 = self.dec0(self.join(x0, self.up1(u1)))  # (B, w, S)
        return self.head(self.drop(u0))  # (B, K, S)

    def join(self, skip, up):  # two (B, c, S') -> (B, c, S') summed or (B, 2c, S') concatenated
        return skip + up if self.add else torch.cat([skip, up], 1)

# 2. BCP: the mask and the mix (Eq. 1-2) ------------------------------------------------------

def bcp_mask(spatial_shape, beta=2 / 3, center=False, generator=None, device=None):
    """The mask M (float, `spatial_shape`): 1 except a 0-box of int(s * beta) voxels per axis,
    its corner uniform in [0, s - size) as the official code (which hard-codes s = 112/80)."""
    M = torch.ones(tuple(spatial_shape), device=device)
    box = []
    for s in spatial_shape:
        size = int(s * beta)  # < s for beta < 1: the range below is never empty
        start = (s - size) // 2 if center else int(torch.randint(0, s - size, (1,),
                                                                 generator=generator))
        box.append(slice(start, start + size))
    M[tuple(box)] = 0
    return M

def mix(outer, inner, mask):
    """outer * M + inner * (1 - M): `inner` fills the 0-box. M (*S) broadcasts over images
    (B, C, *S) and labels (B, *S); labels stay integer."""
    if not (outer.is_floating_point() or inner.is_floating_point()):
        return torch.where(mask.bool(), outer, inner)
    return outer * mask + inner * (1 - mask)

# 3. Losses: cross-entropy and soft Dice, each restricted to a region --------------------------

EPS = 1e-5  # Dice smoothing (official mask_DiceLoss: 1e-5)

def masked_dice_loss(logits, target, region):
    """Soft Dice where region == 1, every class, per sample (as the official LA mask_DiceLoss
    since its first upload; the 2023-10 fix a925e30 was to ACDC's 2-D DiceLoss, whose
    background region was the whole image). target (B, *S), region (*S) or (B, *S):
        L = 1 - mean_{b,k} (2 sum(r p y) + eps) / (sum(r (p + y)) + eps)"""
    K = logits.shape[1]
    p = logits.float().softmax(1)  # (B, K, *S)
    y = F.one_hot(target.long(), K).movedim(-1, 1).float()  # (B, K, *S)
    r = region.float().expand_as(target).unsqueeze(1)  # (B, 1, *S)
    dims = tuple(range(2, p.ndim))
    inter, denom = (r * p * y).sum(dims), (r * (p + y)).sum(dims)  # (B, K) each
    return 1 - ((2 * inter + EPS) / (denom + EPS)).mean()

def masked_ce(logits, target, region):
    """Cross-entropy averaged over the voxels where region == 1: sum(r CE) / sum(r)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (B, *S)
    r = region.float().expand_as(ce)
    return (ce * r).sum() / r.sum().clamp_min(1e-16)

def bcp_loss(logits, outer_target, inner_target, mask, outer_weight, inner_weight):
    """The loss of one mix (Eq. 6-9; official `mix_loss`), each term on its own region:

        L = (w_o Dice(Y_o; M) + w_i Dice(Y_i; 1-M) + w_o CE_M(Y_o) + w_i CE_1-M(Y_i)) / 2

    X_in: w_o = 1, w_i = alpha. X_out: w_o = alpha, w_i = 1. CE is a mean over its region and
    Dice is per region, so alpha scales a region's total, not each voxel: with a 112x112x80
    patch (box = 28.9 % of it) a pseudo-labeled voxel of X_in weighs alpha/0.289 = 1.73 in CE
    against 1/0.711 = 1.41 for a ground-truth voxel (1.2x); in X_out 0.70 against 3.46.
    """
    inv = 1 - mask
    dice = (outer_weight * masked_dice_loss(logits, outer_target, mask)
            + inner_weight * masked_dice_loss(logits, inner_target, inv))
    ce = (outer_weight * masked_ce(logits, outer_target, mask)
          + inner_weight * masked_ce(logits, inner_target, inv))
    return (dice + ce) / 2

def seg_loss(logits, target):
    """(CE + Dice) / 2 over the whole image: pre-training and supervised loss."""
    ones = torch.ones_like(target, dtype=torch.float32)
    return (masked_ce(logits, target, ones) + masked_dice_loss(logits, target, ones)) / 2

# 4. The teacher: EMA of the student, and its pseudo-labels ------------------------------------

@torch.no_grad()
def ema_update(teacher, student, decay):
    """Mean-Teacher step: theta_t <- decay theta_t + (1 - decay) theta_s. BatchNorm running
    statistics too, as official ACDC (official LA: parameters only); only an eval-mode teacher
    (--eval-model teacher) reads them, the train-mode one of self-training uses its batch's."""
    t_b, s_b = list(teacher.buffers()), list(student.buffers())
    t_f = list(teacher.parameters()) + [t for t in t_b if t.is_floating_point()]
    s_f = [p.detach() for p in student.parameters()] + [
        s for t, s in zip(t_b, s_b) if t.is_floating_point()]
    torch._foreach_mul_(t_f, decay)  # fused over all tensors
    torch._foreach_add_(t_f, s_f, alpha=1 - decay)
    for t, s in zip(t_b, s_b):
        if not t.is_floating_point():
            t.copy_(s)

def largest_component(mask):
    """Each sample's largest 26-connected (8 in 2-D) component, (B, *S) -> bool, with scipy on
    the host as the official code (skimage). An empty mask stays empty."""
    from scipy import ndimage
    m, out = mask.bool().cpu().numpy(), np.zeros(mask.shape, bool)
    for b in range(m.shape[0]):
        lab, n = ndimage.label(m[b], np.ones((3,) * (m.ndim - 1), bool))
        if n:
            out[b] = lab == np.bincount(lab.ravel())[1:].argmax() + 1
    return torch.from_numpy(out).to(mask.device)

@torch.no_grad()
def pseudo_label(logits, largest_cc=True):
    """Teacher logits (B, K, *S) -> labels (B, *S): argmax (K = 2: the official softmax >= 0.5),
    then each foreground class keeps its largest component; the rest becomes background."""
    lab = logits.argmax(1)
    return largest_per_class(lab, logits.shape[1]) if largest_cc else lab

def largest_per_class(lab, num_classes):
    """Labels (B, *S): each foreground class keeps its largest component, the rest -> 0."""
    out = torch.zeros_like(lab)
    for k in range(1, num_classes):
        out[largest_component(lab == k)] = k
    return out

# 5. One BCP step. The notebooks draw these same batches -------------------------------------

def pretrain_batch(lab, cfg, g):
    """Stage 1, labeled copy-paste: x = x_a M + x_b (1 - M), labels alike. Deviation: with fewer
    labeled cases than batch_size / 2, a case can be pasted into itself."""
    x, y = lab.batch(lab.draw(cfg.batch_size // 2))  # (2h, 1, *P), (2h, *P)
    h = len(x) // 2
    M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, x.device)  # (*P)
    return {"x": mix(x[:h], x[h:], M), "y": mix(y[:h], y[h:], M), "M": M}

@torch.no_grad()
def selftrain_batch(lab, unl, teacher, cfg, g):
    """Stage 2: teacher pseudo-labels, then both mixes -> x_in, x_out (h, 1, *P), their labels
    y_in, y_out (h, *P), M, and the parts the loss reads: y_a, p_a (X_in), p_b, y_b (X_out)."""
    x, y = lab.batch(lab.draw(cfg.batch_size // 2))  # labeled (2h, 1, *P), (2h, *P)
    u, _ = unl.batch(unl.draw(cfg.batch_size // 2))  # unlabeled (labels: None, never held)
    h = len(x) // 2
    teacher.train()  # official: a train-mode teacher (BatchNorm of the batch), each half alone
    p = torch.cat([pseudo_label(teacher(u[:h]), cfg.pseudo_lcc),
                   pseudo_label(teacher(u[h:]), cfg.pseudo_lcc)])  # (2h, *P)
    M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, x.device)  # (*P)
    y_a, y_b, p_a, p_b = y[:h], y[h:], p[:h], p[h:]
    return {"x_in": mix(x[:h], u[:h], M), "y_in": mix(y_a, p_a, M),  # X_l M + X_u (1 - M)
            "x_out": mix(u[h:], x[h:], M), "y_out": mix(p_b, y_b, M),  # X_u M + X_l (1 - M)
            "M": M, "y_a": y_a, "p_a": p_a, "p_b": p_b, "y_b": y_b}

def stage_loss(stage, model, teacher, lab, unl, cfg, g):
    """The loss of one iteration of stage pretrain | selftrain -> (loss, {name: term})."""
    if cfg.method == "sup":  # the supervised-only baseline: whole labeled crops, no copy-paste,
        # in both stages (BCP's schedule: the same lr and optimizer restart, no teacher)
        x, y = lab.batch(lab.draw(cfg.batch_size // 2))
        loss = seg_loss(model(x), y)
        return loss, {"loss": loss}
    if stage == "pretrain":
        b = pretrain_batch(lab, cfg, g)
        loss = seg_loss(model(b["x"]), b["y"])  # official LA: (CE + Dice) / 2 on the whole mix
        # (deviation for ACDC: its official script sums the two regions' losses instead)
        return loss, {"loss": loss}
    b = selftrain_batch(lab, unl, teacher, cfg, g)
    q_in, q_out = model(b["x_in"]), model(b["x_out"])  # two forwards as official (BN per mix)
    # L_in  =       L_seg(Q_in, Y_l) on M + alpha L_seg(Q_in, P_u) on 1 - M       (Eq. 6-7)
    # L_out = alpha L_seg(Q_out, P_u) on M +      L_seg(Q_out, Y_l) on 1 - M      (Eq. 8-9)
    loss_in = bcp_loss(q_in, b["y_a"], b["p_a"], b["M"], 1.0, cfg.alpha)
    loss_out = bcp_loss(q_out, b["p_b"], b["y_b"], b["M"], cfg.alpha, 1.0)
    return loss_in + loss_out, {"loss": loss_in + loss_out, "loss_in": loss_in,
                                "loss_out": loss_out}

def train_step(run, stage):
    """One iteration on a Run: loss, backward, SGD step, then (stage 2) one EMA step."""
    with run.autocast():
        loss, terms = stage_loss(stage, run.model, run.teacher, run.lab, run.unl, run.cfg, run.g)
    run.optimizer.zero_grad(set_to_none=True)
    (run.scaler.scale(loss) if run.scaler else loss).backward()  # scaler: fp16 on older GPUs
    for p in run.model.parameters() if run.world > 1 else []:  # torchrun: the mean gradient
        torch.distributed.all_reduce(p.grad)  # (no SyncBatchNorm: each process normalises its
        p.grad /= run.world  # own forwards of 2 images, as the official single-GPU code does)
    run.scaler.step(run.optimizer) if run.scaler else run.optimizer.step()
    if run.scaler:
        run.scaler.update()
    if run.teacher is not None:  # BCP self-training (sup has no teacher)
        ema_update(run.teacher, run.model, run.cfg.ema_decay)  # every iteration
    return {k: v.detach() for k, v in terms.items()}

# 6. Data: the official LA layout (3-D) and ACDC's (2-D slices), read once ------------------

CASES_DIR, CASE_FILE = "2018LA_Seg_Training Set", "mri_norm2.h5"
GET = {"LA": "get it with `python get_data.py LA --root {}` (see README)",
       "ACDC": "get the SSL4MIS-preprocessed ACDC data with `python get_data.py ACDC --root {}`"}
CLASS_NAMES = {2: ["LA"], 4: ["RV", "Myo", "LV"]}  # foreground classes: LA; ACDC
DATASET_FILE = "bcp_dataset.json"  # get_data.py's record of a folder it made: classes, norm..
MEMORY_FORMAT = {2: torch.channels_last, 3: torch.channels_last_3d}  # 1.5x faster CPU convs

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

def load_case(root, case, num_classes=2, label=True):
    """One case -> (image float32, label uint8 or None), checked; every problem names the file.
    label=False (an unlabeled case): its label is never read, nor needed."""
    import h5py
    path = case_path(root, case)
    if not path.is_file():
        raise UserError(f"{path}: case {case!r} is in a list but has no file; remove it from "
                        "the list or restore the file" + (" (ACDC: data/slices/ or a flat data/)"
                                                          if is_acdc(root) else ""))
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label")[:1 + label] if k not in f]
            if missing:
                raise UserError(f"{path}: no dataset {' or '.join(map(repr, missing))} (found "
                                f"{list(f.keys())}); every case needs 'image', labeled and "
                                "evaluated ones 'label' (the first --labeled cases of train.list"
                                " are the labeled ones: put them first or lower --labeled)")
            image = np.asarray(f["image"][()], np.float32)
            label = np.asarray(f["label"][()]) if label else None
    except UserError:
        raise
    except Exception as e:  # h5py raises OSError and others on truncated files
        raise UserError(f"{path}: cannot read this HDF5 file ({type(e).__name__}: {e}); it is "
                        "corrupt or truncated: re-download or re-create the case") from None
    shape = image.shape if label is None else label.shape
    problem = (f"image shape {image.shape} and label shape {shape} must be the same 2-D "
               "or 3-D shape" if image.ndim not in (2, 3) or image.shape != shape else
               "the image holds NaN or inf values; fix the preprocessing (np.nan_to_num) or "
               "drop the case" if not np.isfinite(image).all() else
               f"label values {np.unique(label)[:10].tolist()} but {num_classes} classes allow "
               f"0..{num_classes - 1}; fix the label map" if label is not None and (
                   label.min() < 0 or label.max() >= num_classes) else None)
    if problem:
        raise UserError(f"{path}: {problem}")
    return image, None if label is None else label.astype(np.uint8)

def read_list(root, split, num_classes=2):
    """The case ids of `<split>.list`, one per line; a missing or empty list is an error."""
    lst = Path(root) / f"{split}.list"
    cases = lst.read_text().split() if lst.is_file() else []
    if not cases:
        what = "is missing or empty" if Path(root).is_dir() else f"is missing: no folder {root}"
        raise UserError(f"{lst} {what} (the official layouts have train.list (ACDC: also "
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

def patients_to_slices(slices, n):
    """ACDC --labeled counts patients: the slices of the first n patients of the list (BCP's
    patients_to_slices: 3 -> 68, 7 -> 136 with the official train_slices.list)."""
    patients = list(dict.fromkeys(s.split("_")[0] for s in slices))[:n]
    return sum(s.split("_")[0] in patients for s in slices)

NORMS = ("zscore", "minmax", "ct", "none")

def normalize(image, norm, window=(-125.0, 275.0)):
    """One whole scan's intensities as training expects them (float32). zscore (MR, as the LA
    preprocessing): (x - mean) / std; minmax (ACDC, SSL4MIS): to [0, 1]; ct (official Pancreas
    / CoraNet): clip to the HU window, then to [0, 1] (deviation: CoraNet divides by the
    clipped scan's own min-max, the same wherever the scan spans the window; ours is fixed);
    none: as given. get_data.py applies it when it makes a case, --predict to every NIfTI."""
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
    then >= 0.5). Used by get_data.py (--spacing) and --predict on the same config."""
    size = [max(1, round(s * z)) for s, z in zip(x.shape, zoom)]
    t = lambda v: F.interpolate(torch.as_tensor(v, dtype=torch.float32)[None, None], size,  # noqa: E731
                                mode="trilinear", align_corners=False)[0, 0]
    if not label:
        return t(x).numpy()
    classes = np.unique(x)
    return classes[torch.stack([t(x == k) for k in classes]).argmax(0).numpy()].astype(np.uint8)

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
        """n case indices, each pass over the cases in a fresh random order (an epoch)."""
        out = []
        while len(out) < n:
            self.queue = self.queue or torch.randperm(len(self.images), generator=self.g).tolist()
            out.append(self.queue.pop())
        return out

# 7. Training: config and presets, stage 1 (pre-training), stage 2 (self-training) -----------

def _f(default, help, choices=None, type=int):  # a Config field with its --help line
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "type": type})  # type: of a tuple's items

@dataclasses.dataclass
class Config:
    data: str = _f("sample", "preset that sets every default",
                   ["sample", "LA", "LA_half", "ACDC", "ACDC_cpu", "Pancreas"])
    root: str = _f("data_samples", "data folder in the official LA or the ACDC (SSL4MIS) layout")
    labeled: int = _f(2, "LA: the first N cases of train.list are labeled; ACDC: the first N "
                      "patients of train_slices.list (3 -> 68 slices, 7 -> 136)")
    method: str = _f("bcp", "bcp: copy-paste pre-training, then BCP self-training; sup: the "
                     "labeled cases only, no copy-paste, BCP's stages and lr", ["bcp", "sup"])
    pretrain_iters: int = _f(200, "stage 1 iterations (labeled copy-paste)")
    selftrain_iters: int = _f(600, "stage 2 iterations (BCP self-training)")
    patch: tuple = _f((32, 32, 32), "training crop X Y Z (2-D: X Y), sides multiples of 16")
    batch_size: int = _f(8, "crops per iteration: half labeled, half unlabeled")
    width: int = _f(8, "U-Net base width (channels of the first level)")
    top_convs: int = _f(2, "convolutions in each full-resolution U-Net block: 2, or 1 as the "
                        "V-Net's top level (less time per step on a CPU)", [1, 2])
    skip: str = _f("concat", "how each decoder block gets the encoder's features: concat (U-Net)"
                   " or add (V-Net: half the channels in, less time)", ["concat", "add"])
    dropout: float = _f(0.0, "channel dropout on the bottleneck and last features (official 0.5)")
    rotate: int = _f(0, "augmentation. 0: a 90-degree turn and a flip every draw (official "
                     "LA); R: half the draws so, a quarter turned by an integer angle in [-R, R) "
                     "degrees (official ACDC: 20)")
    num_classes: int = _f(2, "classes including background")
    class_names: tuple = _f((), "foreground class names (default: LA; RV Myo LV; 1 2 ..)", type=str)
    norm: str = _f("zscore", "intensities of a whole scan: zscore (MR), minmax, ct (--window),"
                   " none; get_data.py applies it to the cases it writes, --predict to every "
                   "NIfTI scan; h5 cases are read as stored", NORMS)
    window: tuple = _f((-125.0, 275.0), "ct: the HU window LOW HIGH mapped to [0, 1]", type=float)
    spacing: tuple = _f((), "mm per voxel X Y Z the cases were resampled to (get_data.py "
                        "--spacing): --predict resamples NIfTI scans to it, masks back", type=float)
    alpha: float = _f(0.5, "weight of the pseudo-labeled region of each mix (paper: 0.5)")
    beta: float = _f(2 / 3, "box side / crop side of the mask (paper: 2/3)")
    mask_center: bool = _f(False, "centre the box (default: a random place, as official)")
    ema_decay: float = _f(0.99, "Mean-Teacher EMA decay, one EMA step per iteration")
    pseudo_lcc: bool = _f(True, "keep the largest component of pseudo-labels (official)")
    lr: float = _f(0.01, "SGD learning rate; momentum 0.9, weight decay 1e-4 (official)")
    lr_step: int = _f(2500, "self-training lr x0.1 every N iterations (official LA: 2500)")
    seed: int = _f(1337, "seed of every random draw (official: 1337)")
    eval_split: str = _f("test", "list scored after training and by --eval: NAME.list "
                         "(none: no scoring)")
    eval_stride: tuple = _f((16, 16, 16), "sliding-window stride X Y Z at evaluation")
    eval_lcc: bool = _f(True, "keep the largest component of the prediction (official)")
    eval_model: str = _f("student", "weights scored at the end, by --eval and --predict: the "
                         "final student, its EMA teacher, or both (ensemble: their mean softmax)"
                         " (official: the student checkpoint that scored best on test (LA) or "
                         "val (ACDC))", ["student", "teacher", "ensemble"])
    eval_tta: bool = _f(False, "mirror test-time augmentation when scoring and predicting: the "
                        "mean softmax over the 4 flips in x and y of each window (nnU-Net's, "
                        "never along z: 4 forward passes per window; official: none)")
    device: str = _f("auto", "auto (cuda, mps, then cpu) | cpu | cuda | mps")
    compile: bool = _f(False, "torch.compile the student and the teacher for training (inductor;"
                       " a C++ compiler on a CPU): 3-11 %% less a step after minutes of compiling;"
                       " the same weights up to float rounding")
    amp: str = _f("auto", "autocast: bf16 on GPUs of compute capability >= 8.0, fp16 + "
                  "GradScaler on older ones (T4), bf16 on CPUs with AMX or AMD's AVX512-BF16; "
                  "fp32 elsewhere", ["auto", "on", "off"])
    out: str = _f("runs/sample", "run folder: config, log, checkpoints, metrics")
    log_every: int = _f(20, "iterations between log lines (host syncs)")
    ckpt_every: int = _f(200, "iterations between checkpoints, a multiple of --log-every")

PRESETS = {
    "sample": dict(lr_step=300),  # the phantoms, minutes on a CPU; lr x0.1 halfway (README)
    "LA": dict(root="data/LA", labeled=4, pretrain_iters=2000, selftrain_iters=15000,  # paper
               patch=(112, 112, 80), width=16, eval_stride=(18, 18, 4), out="runs/LA",
               log_every=50, ckpt_every=500),
    "LA_half": dict(root="data/LA_half", labeled=4, pretrain_iters=1200, selftrain_iters=2400,
                    patch=(64, 64, 48), width=16, dropout=0.5, eval_stride=(9, 9, 2),
                    lr_step=2000, eval_tta=True, out="runs/LA_half"),  # lr x0.1, last 400
    "ACDC": dict(root="data/ACDC", labeled=3, num_classes=4, norm="minmax",  # official script
                 pretrain_iters=10000, selftrain_iters=30000, patch=(256, 256), batch_size=24,
                 width=16, rotate=20, lr_step=10**9, eval_lcc=False, eval_split="test",
                 out="runs/ACDC"),
    "ACDC_cpu": dict(root="data/ACDC", labeled=3, num_classes=4, norm="minmax", out="runs/ACDC_cpu",
                     pretrain_iters=600, selftrain_iters=4200, patch=(128, 128), batch_size=16,
                     width=16, rotate=20, lr_step=3600, eval_lcc=False, eval_split="val",
                     eval_tta=True),
    "Pancreas": dict(root="data/Pancreas", labeled=12, class_names=("pancreas",), norm="ct",
                     spacing=(1.0, 1.0, 1.0), pretrain_iters=1800, selftrain_iters=5000,
                     patch=(96, 96, 96), width=16, eval_stride=(16, 16, 16), out="runs/Pancreas",
                     log_every=50, ckpt_every=500),  # official: 60 x 30 + 200 x 25 iterations
}  # LA_half: LA at half resolution (get_data.py), sized for a CPU. ACDC: constant lr (official);
# ACDC_cpu: x0.1 for the last 600; LA_half and ACDC_cpu scored with mirror TTA (deviations,
# chosen on validation: docs/choices.md)
# Pancreas (get_data.py pancreas): deviation, official code/pancreas uses V-Net + Adam 1e-3
RUNTIME = {"root", "out", "device", "amp", "compile", "log_every", "ckpt_every", "eval_split",
           "eval_stride", "eval_lcc", "eval_model", "eval_tta"}  # what --resume, --eval may change

def dataset_defaults(root):
    """-> (preset, config defaults) that get_data.py recorded in root/bcp_dataset.json for a
    folder it made (classes, norm, window, spacing, labeled, eval split), or (None, {})."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None, {}
    try:
        d = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(Config)}
        return d.get("preset"), {k: v for k, v in d["config"].items() if k in fields}
    except (ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: not a valid {DATASET_FILE} ({e}); re-create the folder with "
                        "get_data.py or delete the file") from None

def make_config(preset="sample", **overrides):
    """The preset's config; then what the data folder's bcp_dataset.json says; then overrides."""
    root = overrides.get("root", PRESETS[preset].get("root", Config.root))
    merged = {**PRESETS[preset], **dataset_defaults(root)[1], **overrides, "data": preset}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})

def class_names(cfg):
    return list(cfg.class_names or CLASS_NAMES.get(cfg.num_classes) or map(str, range(
        1, cfg.num_classes)))

def config_from_checkpoint(state, given):
    """--resume and --eval: the run's config, flags given now on top (only RUNTIME ones)."""
    older = {"rotate": 0, "eval_tta": False, "top_convs": 2, "skip": "concat"}  # fields added
    saved = {**older, **state["cfg"]}  # later: an older run keeps what it trained with
    fixed = sorted(k for k, v in given.items() if k not in RUNTIME and v != saved.get(k))
    if fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')}: fixed by the checkpoint's run; only "
                        f"{', '.join(sorted(RUNTIME))} may change. Start a new --out instead")
    return make_config(saved["data"], **{**saved, **given, "data": saved["data"]})

def check_config(cfg):
    """Refuse impossible values before any work starts, naming the flag."""
    step = 4 if cfg.method == "bcp" else 2
    bad = [msg for ok, msg in [
        (0 < cfg.beta < 1, f"--beta {cfg.beta}: must be in (0, 1)"),
        (len(cfg.patch) in (2, 3) and all(p > 0 and p % 16 == 0 for p in cfg.patch),
         f"--patch {' '.join(map(str, cfg.patch))}: each side must be a positive multiple of "
         "16 (the U-Net halves it 4 times), e.g. --patch 64 64 48"),
        (cfg.batch_size >= step and cfg.batch_size % step == 0, f"--batch-size "
         f"{cfg.batch_size}: must be a positive multiple of {step} (half labeled, half "
         "unlabeled, each half split into the a and b of a mix)"),
        (len(cfg.eval_stride) == 3 or len(cfg.patch) == 2, "--eval-stride: X Y Z"),
        (cfg.alpha >= 0 and 0 <= cfg.ema_decay <= 1 and 0 <= cfg.dropout < 1 and cfg.lr > 0
         and min(cfg.labeled, cfg.width, cfg.lr_step, *cfg.eval_stride) >= 1 and min(
            cfg.pretrain_iters, cfg.selftrain_iters) >= 0, "--alpha >= 0, --ema-decay in [0, 1]"
         ", --dropout in [0, 1); --lr, --labeled, --width, --lr-step, --eval-stride > 0; "
         "iterations >= 0"),
        (min(cfg.log_every, cfg.ckpt_every) >= 1 and cfg.ckpt_every % cfg.log_every == 0,
         f"--ckpt-every {cfg.ckpt_every}: a multiple of --log-every {cfg.log_every}"),
        (len(cfg.class_names) in (0, cfg.num_classes - 1), f"--class-names: one name per "
         f"foreground class, {cfg.num_classes - 1} for --num-classes {cfg.num_classes}"),
        (len(cfg.window) == 2 and cfg.window[0] < cfg.window[1], "--window LOW HIGH, LOW < HIGH"),
        (0 <= cfg.rotate <= 180, f"--rotate {cfg.rotate}: degrees in [0, 180]"),
        (cfg.top_convs in (1, 2), f"--top-convs {cfg.top_convs}: 1 or 2"),
        (cfg.skip in ("concat", "add"), f"--skip {cfg.skip}: concat or add"),
        (not cfg.spacing or (len(cfg.spacing) == len(cfg.patch) == 3 and min(cfg.spacing) > 0),
         "--spacing X Y Z (mm, > 0), for 3-D data only")] if not ok]
    if bad:
        raise UserError("; ".join(bad))

def pick_device(name="auto"):
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if ok[d]))
    if not ok.get(name.split(":")[0]):
        raise UserError(f"--device {name}: not available here; use --device auto or cpu")
    return torch.device(name)

def cpu_vendor():
    """-> 'AMD', 'Intel' or '' (Linux: /proc/cpuinfo; Windows: platform.processor())."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = platform.processor()
    return "AMD" if "AuthenticAMD" in text else "Intel" if "GenuineIntel" in text else ""

PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # amp_dtype -> its name

def amp_dtype(mode, device):
    """-> the autocast dtype of --amp `mode` on `device`; None: fp32. CUDA: bf16 at compute
    capability >= 8.0, else fp16 (a T4 reports bf16 but emulates it, slowly). CPU, "auto": bf16
    where it measured faster (docs/choices.md): with AMX (1.5x per step), or AVX512-BF16 on an
    AMD CPU (1.7x); fp32 elsewhere: on Intel's AVX512-BF16 without AMX bf16 was 1.1-1.2x slower;
    without either, bf16 is emulated (~80x slower)."""
    amx, avx512_bf16 = [getattr(torch.cpu, f, lambda: False)() for f in (
        "_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if mode == "auto" and device.type == "cpu":
        mode = "on" if amx or (avx512_bf16 and cpu_vendor() == "AMD") else "off"
    if mode == "off" or device.type == "mps":
        return None
    if device.type == "cpu":
        return torch.bfloat16
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.bfloat16 if native_bf16 and torch.cuda.is_bf16_supported() else torch.float16

def amp_setup(mode, device):
    """-> (autocast, GradScaler or None); fp16 alone needs the scaler."""
    dtype = amp_dtype(mode, device)
    if dtype is None:
        return contextlib.nullcontext, None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler

def stage_lr(cfg, stage, it):
    """lr of iteration `it` (from 1): x0.1 every lr_step self-training iterations (official)."""
    return cfg.lr * (0.1 ** ((it - 1) // cfg.lr_step) if stage == "selftrain" else 1)

def save_checkpoint(path, state):
    """Atomic: a temporary file in the same folder, flushed to disk, then renamed."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)

def load_checkpoint(path, hint="give a checkpoint file of a run folder"):
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

@dataclasses.dataclass
class Run:
    """What a training run holds; state() is its checkpoint."""
    cfg: Config
    model: nn.Module
    lab: VolumeSampler
    unl: VolumeSampler
    g: torch.Generator  # every random draw: cases, crops, flips, masks
    teacher: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: object = None
    autocast: object = contextlib.nullcontext
    rank: int = 0  # torchrun: this process, of `world`
    world: int = 1

    def state(self, stage, it):
        """The checkpoint; with several processes every one's random streams (a collective)."""
        sd = lambda m: None if m is None else m.state_dict()  # noqa: E731
        rng = [(self.g.get_state(), torch.get_rng_state(), self.lab.queue, self.unl.queue)]
        if self.world > 1:
            torch.distributed.all_gather_object(rng := rng * self.world, rng[0])
        return {"format": "bcp_minimal/1", "cfg": dataclasses.asdict(self.cfg), "stage": stage,
                "iter": it, "model": sd(self.model), "teacher": sd(self.teacher),
                "optimizer": sd(self.optimizer), "scaler": sd(self.scaler), "rng": rng}

def dist_setup(cfg):
    """-> (rank, world size). Under torchrun: one process per GPU (nccl) or CPU share (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = pick_device(cfg.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(torch.distributed.destroy_process_group)  # else gloo can abort at exit
    return int(os.environ.get("RANK", 0)), world

def make_model(cfg, device="cpu"):
    """The U-Net a config describes (classes, width, 2-D/3-D from the patch, dropout, top level,
    skips)."""
    dims = len(cfg.patch)
    return UNet(1, cfg.num_classes, cfg.width, dims, cfg.dropout, cfg.top_convs, cfg.skip).to(
        device, memory_format=MEMORY_FORMAT[dims])

def compiled(model, cfg):
    """The module itself, compiled in place when cfg.compile (its state_dict keys unchanged)."""
    if not cfg.compile:
        return model
    if next(model.parameters()).device.type == "cpu":
        try:  # inductor builds C++ on a CPU: say so now, not at the first step
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:
            raise UserError(f"--compile: no C++ compiler for torch.compile here ({str(e)[:80]}"
                            "); install one (e.g. g++) or leave --compile off") from None
    model.compile()  # one graph per input shape and train/eval mode, built at its first call
    return model

def teacher_of(student, cfg):
    """theta_t <- theta_s: a frozen copy, compiled anew with --compile (a copy runs eager)."""
    return compiled(copy.deepcopy(student).requires_grad_(False), cfg)

def make_run(cfg):
    """The data, model and random stream of cfg (train and benchmark.py use it)."""
    check_config(cfg)
    (rank, world), device = dist_setup(cfg), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    g = torch.Generator().manual_seed(cfg.seed + rank)  # its own crops and masks per process
    acdc = is_acdc(cfg.root)
    split = "train_slices" if acdc else "train"
    cases = read_list(cfg.root, split, cfg.num_classes)
    n, k = len(set(c.split("_")[0] for c in cases)) if acdc else len(cases), cfg.labeled
    if k >= n + (cfg.method == "sup"):
        unit = "patients" if acdc else "cases"
        raise UserError(f"--labeled {k}: {cfg.root} has {n} training {unit} and BCP needs "
                        f"unlabeled ones; use --labeled {n - 1} or fewer")
    k = patients_to_slices(cases, k) if acdc else k
    _, images, labels = load_split(cfg.root, split, cfg.num_classes, labeled=k)  # labels[k:]: None
    if acdc:  # 2-D slices of many sizes, resized to the patch once (official: every draw)
        images = [resize(torch.from_numpy(im), cfg.patch).numpy() for im in images]
        labels = [resize(torch.from_numpy(lb), cfg.patch).byte().numpy() for lb in labels[:k]]
    model = compiled(make_model(cfg, device), cfg)
    autocast, scaler = amp_setup(cfg.amp, device)
    sampler = lambda ims, lbs: VolumeSampler(ims, lbs, cfg.patch, device, g,  # noqa: E731
                                             rotate=cfg.rotate)
    return Run(cfg, model, sampler(images[:k], labels[:k]), sampler(images[k:], None), g, None,
               None, scaler, autocast, rank, world)

LOG_FIELDS = ["stage", "iter", "lr", "loss", "loss_in", "loss_out", "seconds"]

def train(cfg, state=None, progress=True, on_log=None):
    """Train per cfg into cfg.out -> the Run; `state`: a checkpoint to resume (resume_run).
    "pretrain", then "selftrain" (teacher = the pre-trained student, a new optimizer as
    official LA; official ACDC restores the pre-training one: docs/choices.md). sup runs the
    same two stages, lr and optimizers on plain labeled crops: only the data differ.
    on_log(stage, it, run, rows) runs after each log flush."""
    from tqdm.auto import tqdm
    run, out, t0 = make_run(cfg), Path(cfg.out), time.time()  # seconds: since this process began
    lead = run.rank == 0  # under torchrun only the first process writes files
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.backends.cudnn.benchmark = True
    device = next(run.model.parameters()).device
    if lead:  # what --amp auto chose, and the threads a CPU run uses
        print(f"{cfg.method} on {device}" + (f", {torch.get_num_threads()} threads" if
              device.type == "cpu" else "") + f", {PRECISION[amp_dtype(cfg.amp, device)]} "
              f"(--amp {cfg.amp})")
    stages = [("pretrain", cfg.pretrain_iters), ("selftrain", cfg.selftrain_iters)]
    names, done, rows = [s for s, _ in stages], (stages[0][0], 0), []
    if state is not None:
        if len(state["rng"]) != run.world:
            raise UserError(f"--resume: the run had {len(state['rng'])} processes, not "
                            f"{run.world}; resume it with as many")
        run.model.load_state_dict(state["model"])
        g_state, t_state, run.lab.queue, run.unl.queue = state["rng"][run.rank]
        run.g.set_state(g_state)
        torch.set_rng_state(t_state)
        done = (state["stage"], state["iter"])
        if (out / "log.csv").is_file():  # keep the log up to the checkpoint, re-log the rest
            rows = [r for r in csv.DictReader(open(out / "log.csv")) if (names.index(
                r["stage"]), int(r["iter"])) <= (names.index(done[0]), done[1])]
    if lead:
        with open(out / "log.csv.tmp", "w", newline="") as f:  # atomic, as the checkpoints
            csv.DictWriter(f, LOG_FIELDS).writerows([dict(zip(LOG_FIELDS, LOG_FIELDS))] + rows)
        os.replace(out / "log.csv.tmp", out / "log.csv")
    log = open(out / "log.csv" if lead else os.devnull, "a", newline="")
    ckpt, save = out / "ckpt_last.pt", lambda path, st: lead and save_checkpoint(path, st)
    for stage, iters in stages[names.index(done[0]):]:
        resumed = state is not None and stage == done[0]
        if stage == "selftrain" and cfg.method == "bcp":
            run.teacher = teacher_of(run.model, cfg)  # theta_t <- theta_s
            if resumed:
                run.teacher.load_state_dict(state["teacher"])
        run.optimizer = torch.optim.SGD(run.model.parameters(), cfg.lr, momentum=0.9,
                                        weight_decay=1e-4)
        if resumed:
            run.optimizer.load_state_dict(state["optimizer"])
            if run.scaler is not None:
                run.scaler.load_state_dict(state["scaler"])
        run.model.train()
        first, pending = (done[1] + 1 if resumed else 1), []
        for it in tqdm(range(first, iters + 1), stage, iters, initial=first - 1,
                       disable=not progress or not lead):
            for group in run.optimizer.param_groups:
                group["lr"] = stage_lr(cfg, stage, it)
            pending.append((it, group["lr"], train_step(run, stage)))
            if it % cfg.log_every and it != iters:
                continue
            # A host sync (the pseudo-labels have their own): the loss terms become numbers.
            values = torch.stack([torch.stack(list(t.values())) for *_, t in pending]).tolist()
            new = [{"stage": stage, "iter": i, "lr": lr, **dict(zip(t, v)), "seconds": round(
                time.time() - t0, 1)}
                   for (i, lr, t), v in zip(pending, values)]
            bad = [r["iter"] for r, v in zip(new, values) if not all(map(math.isfinite, v))]
            if bad:
                raise UserError(f"non-finite loss at {stage} iteration {bad[0]}; the run stopped,"
                                f" the last good checkpoint {ckpt} is kept. Lower --lr, try "
                                "--amp off, or check the data for extreme values")
            csv.DictWriter(log, LOG_FIELDS).writerows(new)
            log.flush()
            pending = []
            if it % cfg.ckpt_every == 0 or it == iters:
                save(ckpt, run.state(stage, it))
            if on_log is not None:
                on_log(stage, it, run, new)
                run.model.train()  # the callback may have evaluated the model
        if stage == "pretrain":
            save(out / "pretrain.pt", run.state(stage, iters))
    log.close()
    save(out / "final.pt", run.state(*stages[-1]))
    return run

def resume_run(out, given=None):
    """-> (cfg, checkpoint) of the run in `out`, the RUNTIME flags of `given` on top."""
    state = load_checkpoint(Path(out) / "ckpt_last.pt", "--resume: start without --resume")
    return config_from_checkpoint(state, {**(given or {}), "out": str(out)}), state

# 8. Evaluation: sliding windows over whole volumes, and the paper's four metrics ------------

def window_starts(size, patch, stride):
    """Starts of ceil((size - patch) / stride) + 1 windows, the last at the border (official)."""
    n = math.ceil(max(size - patch, 0) / stride) + 1
    return sorted({min(i * stride, size - patch) for i in range(n)})

@torch.no_grad()
def sliding_window_predict(model, image, patch, stride, batch=4):
    """Class probabilities (K, *S) of a volume (C, *S), as the official test: windows' softmax
    summed, divided by the windows over each voxel; fp32; padded to the patch. Call eval()."""
    S, device = image.shape[1:], next(model.parameters()).device
    pads = [max(p - s, 0) for p, s in zip(patch, S)]
    x = F.pad(image.to(device).float(), [q for p in pads[::-1] for q in (p // 2, p - p // 2)])
    starts = [window_starts(s, p, st) for s, p, st in zip(x.shape[1:], patch, stride)]
    boxes = [tuple(slice(a, a + p) for a, p in zip(c, patch)) for c in itertools.product(*starts)]
    probs, count = 0, torch.zeros(x.shape[1:], device=device)
    for i in range(0, len(boxes), batch):
        p = model(torch.stack([x[(slice(None), *b)] for b in boxes[i:i + batch]])).softmax(1)
        probs = probs if torch.is_tensor(probs) else p.new_zeros(p.shape[1], *x.shape[1:])
        for b, pw in zip(boxes[i:i + batch], p):
            probs[(slice(None), *b)] += pw
            count[b] += 1
    return (probs / count)[(slice(None), *(slice(p // 2, p // 2 + s) for p, s in zip(pads, S)))]

class Averaged(nn.Module):
    """Test-time ensembles as one model: the mean softmax of `models`, each over the 4 mirror
    images of its input in x and y if `mirror` (flip the window, predict, flip back: nnU-Net's
    test-time augmentation, restricted to the flips training draws). Returns log(mean p): its
    softmax is the mean p and its argmax that of the mean, so the sliding window and the 2-D
    path take it as they take a model's logits."""

    def __init__(self, models, mirror=False):
        super().__init__()
        self.models, self.mirror = nn.ModuleList(models), mirror

    def forward(self, x):  # (B, C, *S) -> (B, K, *S)
        # Deviation from nnU-Net (which mirrors every axis): x and y only (dims 2, 3), the flips
        # VolumeSampler trains with; 3-D never along z (LA_half val: docs/choices.md)
        flips = [(), (2,), (3,), (2, 3)] if self.mirror else [()]
        p = [m(x.flip(f)).softmax(1).flip(f) for m in self.models for f in flips]
        return torch.stack(p).mean(0).log()

def scored_model(cfg, state, device):
    """-> (the model --eval / --predict use, its name): cfg.eval_model's weights of checkpoint
    `state` (the student where it has no teacher: pre-training, supervised), mirrored if
    cfg.eval_tta."""
    keys = {"student": ["model"], "teacher": ["teacher"], "ensemble": ["model", "teacher"]}[
        cfg.eval_model] if state["teacher"] else ["model"]
    models = [make_model(cfg, device) for _ in keys]
    for m, k in zip(models, keys):
        m.load_state_dict(state[k])
    name = "+".join({"model": "student", "teacher": "teacher"}[k] for k in keys)
    if cfg.eval_tta:
        return Averaged(models, mirror=True), name + ", mirrored"
    return (models[0] if len(models) == 1 else Averaged(models)), name

def dice(pred, gt, spacing=None):
    """2|P & G| / (|P| + |G|); both empty: 1.0 (nothing to find, none found; medpy's dc gives
    nan or 0 there, depending on its and NumPy's versions)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = pred.sum() + gt.sum()
    return float(2 * (pred & gt).sum() / denom) if denom else 1.0

def jaccard(pred, gt, spacing=None):
    """|P & G| / |P | G|; both empty: 1.0, as medpy's jc."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0

def surface_metrics(pred, gt, spacing=None):
    """(hd95, asd) as medpy's, from two distance transforms on the box around P | G. An empty
    prediction (or ground truth) scores the volume's diagonal, the worst distance (medpy
    raises, the official code scored 0, a *perfect* value); both empty: 0."""
    from scipy import ndimage
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        sp = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, float)
        worst = float(np.sqrt((((np.asarray(pred.shape) - 1) * sp) ** 2).sum()))
        return (worst, worst) if pred.any() or gt.any() else (0.0, 0.0)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(pred | gt))
    cross = ndimage.generate_binary_structure(pred.ndim, 1)  # medpy's surface: A - erosion(A)
    pb, gb = (a[box] ^ ndimage.binary_erosion(a[box], cross) for a in (pred, gt))
    d_pg = ndimage.distance_transform_edt(~gb, sampling=spacing)[pb]  # P surface -> G surface
    d_gp = ndimage.distance_transform_edt(~pb, sampling=spacing)[gb]
    return float(np.percentile(np.hstack([d_pg, d_gp]), 95)), float(d_pg.mean())

def hd95(pred, gt, spacing=None):
    """95th percentile of the surface distances, both directions (medpy's hd95)."""
    return surface_metrics(pred, gt, spacing)[0]

def asd(pred, gt, spacing=None):
    """Mean distance from the prediction's surface to the ground truth's (medpy's asd)."""
    return surface_metrics(pred, gt, spacing)[1]

@torch.no_grad()
def predict_volume(model, image, cfg, size=None):
    """Labels (*S) of one scan: 3-D by sliding windows (`size`: probabilities resampled to that
    grid first, trilinear); 2-D models (ACDC) slice by slice, each resized to the patch and
    the prediction back (official test_single_volume, nearest)."""
    if len(cfg.patch) == 3:
        prob = sliding_window_predict(model, image[None], cfg.patch, cfg.eval_stride)  # (K, *S)
        if size is not None and tuple(size) != tuple(prob.shape[1:]):
            prob = F.interpolate(prob[None], tuple(size), mode="trilinear")[0]
        return prob.argmax(0)
    dev = next(model.parameters()).device
    return torch.stack([resize(model(resize(sl.to(dev), cfg.patch)[None, None]).argmax(1)[0],
                               sl.shape).long() for sl in image])  # (slices, H, W)

def evaluate(model, cfg, split=None, out=None, progress=True):
    """Score `model` on `<split>.list` (default cfg.eval_split), write out/metrics.json. Per
    case and foreground class: the prediction (predict_volume), its largest component
    (official LA post-processing, cfg.eval_lcc), then Dice, Jaccard, 95HD, ASD in voxels.
    Several classes (ACDC): the top-level numbers are the means over the classes."""
    from tqdm.auto import tqdm
    cases, images, labels = load_split(cfg.root, split or cfg.eval_split, cfg.num_classes)
    model.eval()
    names, keys, rows = class_names(cfg), (
        "dice", "jaccard", "hd95", "asd"), []
    for case, image, gt in tqdm(list(zip(cases, images, labels)), "eval", disable=not progress):
        pred = predict_volume(model, torch.from_numpy(image), cfg)[None]  # (1, *S)
        per = {}
        for k, name in enumerate(names, 1):
            p = (largest_component(pred == k) if cfg.eval_lcc else pred == k)[0].cpu().numpy()
            h95, mean_sd = surface_metrics(p, gt == k)
            per[name] = dict(dice=dice(p, gt == k), jaccard=jaccard(p, gt == k), hd95=h95,
                             asd=mean_sd)
        rows.append({"case": case, **{m: float(np.mean([c[m] for c in per.values()]))
                                      for m in keys}, **({"classes": per} if len(per) > 1 else {})})
    metrics = {m: float(np.mean([r[m] for r in rows])) for m in keys}
    if len(names) > 1:
        metrics["classes"] = {c: {m: float(np.mean([r["classes"][c][m] for r in rows]))
                                  for m in keys} for c in names}
    metrics["cases"] = rows
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

# 9. Segmenting new scans: NIfTI or h5 in, NIfTI masks and volumes in mL out ----------------

def read_scan(path, cfg):
    """-> (image float32 as training reads its cases, affine, header or None, voxel mm3 or
    None, the input's shape). A NIfTI scan is raw: normalised by the run's cfg.norm (the
    function get_data.py made the cases with) and resampled to cfg.spacing if set. An h5 scan
    is a case already prepared (as the LA and ACDC files): read as stored."""
    if path.suffix == ".h5":
        import h5py
        with h5py.File(path, "r") as f:
            image, affine, header = np.asarray(f["image"][()], np.float32), np.eye(4), None
            voxel = float(np.prod(f.attrs["spacing"])) if "spacing" in f.attrs else None
    else:
        import nibabel as nib
        nii = nib.load(str(path))
        image, affine, header = np.asarray(nii.get_fdata(), np.float32), nii.affine, nii.header
        voxel = float(np.prod(nii.header.get_zooms()[:3]))
    if image.ndim != 3:
        raise ValueError(f"a {image.ndim}-D image; give one 3-D scan per file")
    if not np.isfinite(image).all():
        raise ValueError("the image holds NaN or inf values")
    shape = image.shape
    if header is not None:
        image = normalize(image, cfg.norm, cfg.window)
        if cfg.spacing:  # mm per voxel of the scan / of the cases
            image = resample(image, np.array(header.get_zooms()[:3]) / cfg.spacing)
    return image, affine, header, voxel, shape

def predict(model, cfg, source, out, rank=0, world=1, progress=True):
    """Segment every .nii/.nii.gz/.h5 scan in `source` (a file or a folder) into
    out/<name>.nii.gz (the input's shape, affine and header; h5: identity affine) and
    out/volumes.csv. As --eval: the same prediction (padded where smaller than the patch) and
    largest component. A bad scan (unreadable, not 3-D, NaN) is named in one line and skipped;
    a scan whose mask exists is skipped. Ranks share the scans.
    -> the names of the scans that failed."""
    import nibabel as nib
    from tqdm.auto import tqdm
    src, out = Path(source), Path(out)
    scans = sorted(p for p in (src.iterdir() if src.is_dir() else [src])
                   if p.name.endswith((".nii", ".nii.gz", ".h5")))[rank::world]
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    failed, rows, names = [], [], class_names(cfg)
    for path in tqdm(scans, "predict", disable=not progress):
        name = path.name.split(".")[0]
        name = name[:-5] if name.endswith("_0000") else name  # nnU-Net's channel 0: the case
        if (out / f"{name}.nii.gz").is_file():
            continue
        try:
            image, affine, header, voxel, shape = read_scan(path, cfg)
            x = torch.from_numpy(image if len(cfg.patch) == 3 else image.transpose(2, 0, 1))
            lab = predict_volume(model, x, cfg, shape if len(cfg.patch) == 3 else None)[None]
            lab = largest_per_class(lab, cfg.num_classes) if cfg.eval_lcc else lab
            lab = lab[0].cpu().numpy().astype(np.uint8)
            lab = lab if len(cfg.patch) == 3 else lab.transpose(1, 2, 0)  # back to (H, W, slices)
        except Exception as e:
            print(f"error: {path}: {e}; skipped", file=sys.stderr)
            failed.append(path.name)
            continue
        mask = nib.Nifti1Image(lab, affine, header)
        mask.set_data_dtype(np.uint8)  # the input's header, but integer labels
        nib.save(mask, str(out / f"{name}.nii.gz"))
        for k, cname in enumerate(names, 1):
            n = int((lab == k).sum())
            rows.append([name, cname, n, "" if voxel is None else round(n * voxel / 1000, 3)])
    if world > 1:  # the first process writes every process's rows
        every = [None] * world
        torch.distributed.all_gather_object(every, (rows, failed))
        rows, failed = [r for e in every for r in e[0]], [f for e in every for f in e[1]]
    new = not (out / "volumes.csv").is_file()
    with open(out / "volumes.csv" if rank == 0 else os.devnull, "a", newline="") as f:
        csv.writer(f).writerows(([["case", "class", "voxels", "ml"]] if new else []) + rows)
    return failed  # (ml: empty where the spacing is unknown)

# 10. Command line: every Config field is a flag, --data picks the preset of the defaults -----

def _bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")

def main(argv=None):
    first = argparse.ArgumentParser(add_help=False)  # --data first: it sets the defaults shown
    first.add_argument("--data", choices=list(PRESETS))
    first.add_argument("--root")
    known = first.parse_known_args(argv)[0]
    try:  # a folder made by get_data.py names its preset: --root OUT alone picks it
        data = known.data or (known.root and dataset_defaults(known.root)[0]) or "sample"
        base = make_config(data, **({"root": known.root} if known.root else {}))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description="Bidirectional Copy-Paste (BCP, CVPR 2023): semi-"
                                "supervised segmentation of 3-D volumes (LA) and 2-D slices (ACDC)."
                                f" Defaults: --data {data}'s (`--data NAME --help`: another's).")
    for f in dataclasses.fields(Config):  # given flags are not None: told apart from defaults
        kw = (dict(type=f.metadata["type"], nargs="+") if isinstance(f.default, tuple)
              else {"type": _bool if isinstance(f.default, bool) else type(f.default)})
        d = getattr(base, f.name)
        shown = " ".join(map(str, d)) if isinstance(d, tuple) else f"{d:.4g}" if isinstance(
            d, float) else d
        p.add_argument("--" + f.name.replace("_", "-"), help=f"{f.metadata['help']} "
                       f"[default: {shown}]", choices=f.metadata["choices"], **kw)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval", metavar="CKPT", help="score a checkpoint on --eval-split, no training")
    p.add_argument("--predict", metavar="IN", help="segment a NIfTI/h5 file or folder (--ckpt)")
    p.add_argument("--ckpt", help="the checkpoint --predict uses")
    args = p.parse_args(argv)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
             if k not in ("data", "resume", "eval", "predict", "ckpt") and v is not None}
    try:
        cfg, state, extra = make_config(data, **given), None, {}
        if args.eval or args.predict:  # writes beside the checkpoint, never over the run's own
            if args.predict and not args.ckpt:
                raise UserError("--predict needs --ckpt CKPT (a checkpoint of a training run)")
            ckpt, kind = args.eval or args.ckpt, "predict" if args.predict else "eval"
            state = load_checkpoint(ckpt)
            cfg = config_from_checkpoint(state, {
                "out": str(Path(ckpt).parent / f"{kind}_{Path(ckpt).stem}"), **given})
        else:
            if args.resume:
                cfg, state = resume_run(cfg.out, given)
            check_config(cfg)  # the flags first, then the data (the eval list: now, not later)
            if not args.resume and cfg.data != "sample" and "root" not in given and not Path(
                    cfg.root).is_dir():
                if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # not N downloads into one folder
                    raise UserError(f"{cfg.root} is missing; under torchrun fetch it first, once:"
                                    f" `python get_data.py {cfg.data} --root {cfg.root}`")
                import get_data  # the default root is missing: fetch it (helper beside us)
                get_data.prepare(cfg.data, cfg.root)
            if cfg.eval_split != "none":
                read_list(cfg.root, cfg.eval_split, cfg.num_classes)
            t0 = time.time()
            if train(cfg, state).rank:
                return 0  # under torchrun the first process evaluates
            extra = {"train_seconds": round(time.time() - t0, 1)}
            state = load_checkpoint(Path(cfg.out) / "final.pt")  # scored as --eval scores it
        if not args.predict and cfg.eval_split == "none":  # a folder without held-out labels
            if args.eval:
                raise UserError("--eval: give --eval-split NAME (a list of labeled cases)")
            (Path(cfg.out) / "metrics.json").write_text(json.dumps(extra, indent=2))
            print(f"trained into {cfg.out} (--eval-split none: not scored; --predict scans)")
            return 0
        rank, world = dist_setup(cfg) if args.predict else (0, 1)  # torchrun: share scans
        model, use = scored_model(cfg, state, pick_device(cfg.device))
        if args.predict:
            failed = predict(model, cfg, args.predict, cfg.out, rank, world)
            if rank == 0:
                print(f"masks and volumes.csv in {cfg.out}; {len(failed)} scans failed")
            return 1 if failed else 0
        metrics = {**evaluate(model, cfg), **extra, "scored": use}  # + time, which weights
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.method} ({use}) on {cfg.root}, {len(metrics['cases'])} {cfg.eval_split} cases: "
          f"Dice {metrics['dice']:.4f}  Jaccard {metrics['jaccard']:.4f}  95HD "
          f"{metrics['hd95']:.2f}  ASD {metrics['asd']:.2f}  -> {Path(cfg.out) / 'metrics.json'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
