"""bcp_minimal — Bidirectional Copy-Paste (BCP) for semi-supervised 3-D segmentation, in one file.

Bai, Chen, Li, Ma, Shen, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023 (arXiv 2305.00673). Official code: github.com/DeepMed-Lab-ECNU/BCP.

The idea in one paragraph. A Mean-Teacher predicts pseudo-labels for unlabeled scans. A
box-shaped mask M (zeros in a box covering beta = 2/3 of each axis, ones elsewhere) cuts one
labeled and one unlabeled scan and pastes them into each other, *in both directions*:

    X_in  = X_l ⊙ M + X_u ⊙ (1 − M)     (an unlabeled box pasted into a labeled scan)
    X_out = X_u ⊙ M + X_l ⊙ (1 − M)     (a labeled box pasted into an unlabeled scan)

The student is trained on both mixes; its labels are mixed the same way from ground truth and
teacher pseudo-labels, and each voxel's loss is weighted 1 where its label is ground truth and
alpha = 0.5 where it is a pseudo-label. The teacher follows the student by EMA every iteration.
Because labeled and unlabeled voxels are mixed symmetrically, the two distributions are
pulled together instead of the network learning "labeled scans" and "unlabeled scans" apart.

Reading order (each section is separated by a ruler):
    config -> U-Net -> BCP mask & mix -> losses -> teacher & pseudo-labels -> data
    -> training -> evaluation & metrics -> sample data & download -> command line

Run `python bcp_minimal.py` for the bundled synthetic data, `python bcp_minimal.py --data LA
--root DIR` for the real Left Atrium data, `python bcp_minimal.py --help` for every flag.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# Config: one dataclass, presets are plain dicts, the command line is generated from fields.
# ------------------------------------------------------------------------------------------


@dataclass
class Config:
    data: str = "sample"  # preset name: sample | LA | LA_half
    root: str = "data_samples"  # folder in the official LA layout
    labeled: int = 2  # the first N cases of train.list are labeled, the rest unlabeled
    method: str = "bcp"  # bcp: copy-paste pre-training + BCP self-training | sup: labeled only
    pretrain_iters: int = 200  # stage 1: labeled copy-paste pre-training
    selftrain_iters: int = 400  # stage 2: BCP self-training (sup trains pretrain+selftrain iters)
    patch: tuple = (32, 32, 32)  # training crop (x, y, z); each side divisible by 16
    batch_size: int = 8  # images per batch: half labeled, half unlabeled
    width: int = 8  # U-Net base width (channels of the first level)
    num_classes: int = 2  # background + left atrium
    alpha: float = 0.5  # loss weight of pseudo-labeled voxels (paper: alpha = 0.5)
    beta: float = 2 / 3  # box side / image side (paper and official code: 2/3)
    mask_center: bool = False  # False: box at a random place (official code); True: centred
    ema_decay: float = 0.99  # Mean-Teacher decay, one EMA step per iteration
    teacher_mode: str = "train"  # BN mode of the teacher's forward pass: train | eval
    pseudo_lcc: bool = True  # keep the largest connected component of pseudo-labels
    lr: float = 0.01  # SGD, momentum 0.9, weight decay 1e-4 (official)
    lr_step: int = 2500  # lr x 0.1 every lr_step iterations of a stage (official: 2500)
    lr_schedule: str = "step"  # step: official x0.1 every lr_step | poly: lr (1 - t/T)^0.9 per stage
    weight_decay: float = 1e-4
    seed: int = 1337  # official seed
    eval_stride: tuple = (16, 16, 16)  # sliding-window stride at evaluation
    eval_lcc: bool = True  # keep the largest component of the final prediction
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: str = "auto"  # auto | on | off: bf16 (fp16 + GradScaler on older GPUs) on CUDA only
    compile: bool = False  # torch.compile the student (GPU, PyTorch >= 2)
    out: str = "runs/sample"  # everything of the run goes here
    log_every: int = 20  # iterations between progress/log flushes (the only host syncs)
    ckpt_every: int = 200  # iterations between checkpoints (a multiple of log_every)


PRESETS: dict[str, dict] = {
    # The bundled synthetic phantoms: a whole run in minutes on a laptop CPU.
    "sample": dict(),
    # The paper's / official LA settings (full resolution, a GPU).
    "LA": dict(
        root="data/LA", labeled=4, pretrain_iters=2000, selftrain_iters=15000,
        patch=(112, 112, 80), batch_size=8, width=16, eval_stride=(18, 18, 4),
        out="runs/LA", log_every=50, ckpt_every=500,
    ),
    # Half-resolution LA (every axis /2) for CPUs: same method, smaller crop.
    "LA_half": dict(
        root="data/LA_half", labeled=4, pretrain_iters=1200, selftrain_iters=2400,
        patch=(64, 64, 48), batch_size=8, width=16, eval_stride=(9, 9, 2),
        out="runs/LA_half", log_every=20, ckpt_every=200,
    ),
}


class UserError(Exception):
    """A problem with the user's data, flags or files: printed without a traceback, exit 2."""


def make_config(preset: str = "sample", **overrides) -> Config:
    if preset not in PRESETS:
        raise UserError(f"--data {preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], "data": preset})
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"Config has no field {k!r}")
        setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse impossible values before any work starts, naming the flag."""
    bad = []
    if not 0 < cfg.beta < 1:
        bad.append(f"--beta {cfg.beta}: must be in (0, 1) (the box covers beta of each axis)")
    if cfg.alpha < 0:
        bad.append(f"--alpha {cfg.alpha}: must be >= 0 (weight of pseudo-labeled voxels)")
    if len(cfg.patch) != 3 or any(p <= 0 or p % 16 for p in cfg.patch):
        bad.append(f"--patch {' '.join(map(str, cfg.patch))}: each side must be a positive "
                   "multiple of 16 (the U-Net halves the size 4 times), e.g. --patch 64 64 48")
    if cfg.method not in ("bcp", "sup"):
        bad.append(f"--method {cfg.method}: choose bcp or sup")
    step = 4 if cfg.method == "bcp" else 2
    if cfg.batch_size < step or cfg.batch_size % step:
        bad.append(f"--batch-size {cfg.batch_size}: must be a positive multiple of {step} "
                   "(half labeled, half unlabeled, each half split into the a/b images of a mix)"
                   if step == 4 else f"--batch-size {cfg.batch_size}: must be even and >= 2")
    if not 0 <= cfg.ema_decay <= 1:
        bad.append(f"--ema-decay {cfg.ema_decay}: must be in [0, 1]")
    if cfg.labeled < 1:
        bad.append(f"--labeled {cfg.labeled}: at least one labeled case is needed")
    if cfg.teacher_mode not in ("train", "eval"):
        bad.append(f"--teacher-mode {cfg.teacher_mode}: choose train or eval")
    if cfg.lr_schedule not in ("step", "poly"):
        bad.append(f"--lr-schedule {cfg.lr_schedule}: choose step or poly")
    if cfg.lr <= 0 or cfg.width < 1 or cfg.pretrain_iters < 0 or cfg.selftrain_iters < 0:
        bad.append("--lr, --width must be positive and iteration counts >= 0")
    if cfg.log_every < 1 or cfg.ckpt_every < 1 or cfg.ckpt_every % cfg.log_every:
        bad.append(f"--ckpt-every {cfg.ckpt_every} must be a multiple of --log-every {cfg.log_every}")
    if len(cfg.eval_stride) != 3 or any(s < 1 for s in cfg.eval_stride):
        bad.append("--eval-stride: three positive integers")
    if bad:
        raise UserError("; ".join(bad))


# ------------------------------------------------------------------------------------------
# The network: a plain U-Net (the paper used V-Net; any encoder-decoder works with BCP).
# ------------------------------------------------------------------------------------------


class ConvBlock(nn.Sequential):
    """(conv 3^d -> BatchNorm -> ReLU) x 2."""

    def __init__(self, cin: int, cout: int, dims: int):
        Conv, Norm = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        super().__init__(
            Conv(cin, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(inplace=True),
            Conv(cout, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with 4 down-samplings: widths w, 2w, 4w, 8w, 16w.

    Input (B, in_channels, *spatial) -> logits (B, num_classes, *spatial).
    Input-size rule: every spatial side must be divisible by 16 (2^4 poolings); sliding-window
    evaluation pads volumes for you. dims=3 for volumes, dims=2 for slices.

    Deviation: the BCP paper and official LA code use V-Net (5x5x5 residual convs, PReLU,
    dropout). A U-Net of width 16 has fewer parameters (5.6 M vs 9.4 M) and trains faster;
    BCP itself is architecture-agnostic. There is no dropout here, so the teacher's
    train/eval mode only changes BatchNorm (see Config.teacher_mode).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16, dims: int = 3):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        self.dims = dims
        c = [width * 2**i for i in range(5)]  # [w, 2w, 4w, 8w, 16w]
        Up = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.pool = nn.MaxPool3d(2) if dims == 3 else nn.MaxPool2d(2)
        self.enc0 = ConvBlock(in_channels, c[0], dims)
        self.enc1 = ConvBlock(c[0], c[1], dims)
        self.enc2 = ConvBlock(c[1], c[2], dims)
        self.enc3 = ConvBlock(c[2], c[3], dims)
        self.enc4 = ConvBlock(c[3], c[4], dims)  # bottleneck, 1/16 resolution
        self.up4, self.dec3 = Up(c[4], c[3], 2, stride=2), ConvBlock(2 * c[3], c[3], dims)
        self.up3, self.dec2 = Up(c[3], c[2], 2, stride=2), ConvBlock(2 * c[2], c[2], dims)
        self.up2, self.dec1 = Up(c[2], c[1], 2, stride=2), ConvBlock(2 * c[1], c[1], dims)
        self.up1, self.dec0 = Up(c[1], c[0], 2, stride=2), ConvBlock(2 * c[0], c[0], dims)
        self.head = (nn.Conv3d if dims == 3 else nn.Conv2d)(c[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"UNet input spatial size {tuple(x.shape[2:])}: each side must be divisible by 16")
        x0 = self.enc0(x)  # (B, w,   S)
        x1 = self.enc1(self.pool(x0))  # (B, 2w,  S/2)
        x2 = self.enc2(self.pool(x1))  # (B, 4w,  S/4)
        x3 = self.enc3(self.pool(x2))  # (B, 8w,  S/8)
        x4 = self.enc4(self.pool(x3))  # (B, 16w, S/16)
        u3 = self.dec3(torch.cat([x3, self.up4(x4)], 1))  # (B, 8w, S/8)
        u2 = self.dec2(torch.cat([x2, self.up3(u3)], 1))  # (B, 4w, S/4)
        u1 = self.dec1(torch.cat([x1, self.up2(u2)], 1))  # (B, 2w, S/2)
        u0 = self.dec0(torch.cat([x0, self.up1(u1)], 1))  # (B, w,  S)
        return self.head(u0)  # (B, K, S)


# ------------------------------------------------------------------------------------------
# BCP: the mask and the mix.
# ------------------------------------------------------------------------------------------


def bcp_mask(spatial_shape, beta: float = 2 / 3, center: bool = False,
             generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The copy-paste mask M of the paper, a float tensor of `spatial_shape`.

    M is 1 everywhere except a box of int(s * beta) voxels per axis s, which is 0.
    center=False puts the box at a uniformly random place (as the official code does);
    center=True centres it (the paper's "zero-centred" wording). The official code hard-codes
    the image sizes 112/80 when drawing the box's corner; here every size comes from the shape.
    """
    M = torch.ones(tuple(spatial_shape), device=device)
    box = []
    for s in spatial_shape:
        size = int(s * beta)
        if center:
            start = (s - size) // 2
        else:  # corner uniform in [0, s - size], drawn on the CPU generator (reproducible)
            start = int(torch.randint(0, s - size + 1, (1,), generator=generator))
        box.append(slice(start, start + size))
    M[tuple(box)] = 0
    return M


def mix(outer: torch.Tensor, inner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """outer ⊙ M + inner ⊙ (1 − M): `inner` shows inside the zero box, `outer` around it.

    mask has only the spatial shape (*S) and broadcasts over batch/channel: images
    (B, C, *S) and labels (B, *S) both work. Labels stay integer (a selection, not arithmetic).
    """
    if not (outer.is_floating_point() or inner.is_floating_point()):
        return torch.where(mask.bool(), outer, inner)  # integer labels stay integer
    return outer * mask + inner * (1 - mask)


# ------------------------------------------------------------------------------------------
# Losses: cross-entropy and soft Dice, each restricted to a region.
# ------------------------------------------------------------------------------------------

EPS = 1e-5  # smoothing of the soft Dice (official mask_DiceLoss uses 1e-5)


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Soft Dice counted only where region == 1, for every class (background included).

        L = 1 − mean_{b,k} (2 Σ r p y + eps) / (Σ r (p + y) + eps)

    logits (B, K, *S); target (B, *S) integer; region (*S) or (B, *S) in {0, 1}.
    The early official version masked only the foreground term; every class is counted here,
    as in the fixed upstream loss. Dice is per sample (not pooled over the batch).
    """
    K = logits.shape[1]
    p = logits.float().softmax(1)  # (B, K, *S)
    y = F.one_hot(target.long(), K).movedim(-1, 1).float()  # (B, K, *S)
    r = region.float().expand_as(target).unsqueeze(1)  # (B, 1, *S)
    dims = tuple(range(2, p.ndim))
    inter = (r * p * y).sum(dims)  # (B, K)
    denom = (r * (p + y)).sum(dims)  # (B, K)
    return 1 - ((2 * inter + EPS) / (denom + EPS)).mean()


def masked_ce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the voxels where region == 1: Σ r·CE / Σ r."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (B, *S)
    r = region.float().expand_as(ce)
    return (ce * r).sum() / r.sum().clamp_min(1e-16)


def bcp_loss(logits, outer_target, inner_target, mask, outer_weight, inner_weight) -> torch.Tensor:
    """The paper's region-weighted segmentation loss on one mixed batch (Eq. 6-9).

        L = ( w_o·Dice(Q, Y_outer; M) + w_i·Dice(Q, Y_inner; 1−M)
              + w_o·CE_M(Q, Y_outer) + w_i·CE_{1−M}(Q, Y_inner) ) / 2

    For X_in (labeled outside the box): w_o = 1, w_i = alpha. For X_out: w_o = alpha, w_i = 1.
    Each term only sees its own region, so a pseudo-label never supervises a ground-truth voxel.
    """
    inv = 1 - mask
    dice = outer_weight * masked_dice_loss(logits, outer_target, mask) + \
        inner_weight * masked_dice_loss(logits, inner_target, inv)
    ce = outer_weight * masked_ce(logits, outer_target, mask) + \
        inner_weight * masked_ce(logits, inner_target, inv)
    return (dice + ce) / 2


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(CE + Dice) / 2 over the whole image: the pre-training and supervised loss."""
    ones = torch.ones_like(target, dtype=torch.float32)
    return (masked_ce(logits, target, ones) + masked_dice_loss(logits, target, ones)) / 2


# ------------------------------------------------------------------------------------------
# The teacher: EMA of the student, and its pseudo-labels.
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """One Mean-Teacher step, called once per iteration:  θ_t ← decay·θ_t + (1 − decay)·θ_s.

    All parameters in one fused update (torch._foreach_*). Floating BatchNorm buffers
    (running mean/var) get the same average, so an eval-mode teacher normalises with
    statistics that match its weights; integer buffers (num_batches_tracked) are copied.
    (The official code averages parameters only; in train mode buffers are unused anyway.)
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, s_params, alpha=1 - decay)
    pairs = list(zip(teacher.buffers(), student.buffers()))
    t_float = [t for t, _ in pairs if t.is_floating_point()]
    if t_float:
        torch._foreach_mul_(t_float, decay)
        torch._foreach_add_(t_float, [s for t, s in pairs if t.is_floating_point()], alpha=1 - decay)
    for t, s in pairs:
        if not t.is_floating_point():
            t.copy_(s)


def largest_component(mask: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Keep the largest 26-connected (8 in 2-D) component of each sample's binary mask.

    mask (B, *S) bool/int -> same shape, bool. An empty mask stays empty.
    method "scipy": scipy.ndimage.label on the CPU (what the official code does with
    scikit-image, same connectivity). method "torch": label propagation on the tensor's own
    device (each voxel takes the max label of its neighbours until nothing changes; one host
    sync per 16 propagation steps to test that), so a GPU never copies volumes to the host.
    "auto": torch on GPUs, scipy on the CPU.
    """
    mask = mask.bool()
    if method == "auto":
        method = "scipy" if mask.device.type == "cpu" else "torch"
    if method == "scipy":
        from scipy import ndimage

        out = np.zeros(mask.shape, bool)
        m = mask.cpu().numpy()
        structure = np.ones((3,) * (m.ndim - 1), bool)
        for b in range(m.shape[0]):
            lab, n = ndimage.label(m[b], structure)
            if n > 0:
                out[b] = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
        return torch.from_numpy(out).to(mask.device)
    # torch: labels = linear index + 1 on foreground; propagate the max over 3^d neighbourhoods.
    B, S = mask.shape[0], mask.shape[1:]
    pool = F.max_pool3d if len(S) == 3 else F.max_pool2d
    n = math.prod(S)
    lab = torch.arange(1, n + 1, device=mask.device, dtype=torch.float32 if n < 2**24 else torch.float64)
    lab = lab.reshape(1, *S).expand(B, *S) * mask  # (B, *S), 0 = background
    lab = lab.unsqueeze(1)
    fg = mask.unsqueeze(1)
    while True:  # check for convergence every 16 steps: one host sync per 16 propagations
        prev = lab
        for _ in range(16):
            lab = pool(lab, 3, 1, 1) * fg
        if torch.equal(lab, prev):
            break
    lab = lab.squeeze(1).long().flatten(1)  # (B, N): each component carries one label id
    sizes = torch.zeros(B, n + 1, device=mask.device).scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float32))
    best = sizes[:, 1:].argmax(1) + 1  # (B,) label id of the largest component (no host sync)
    return ((lab == best[:, None]) & (lab > 0)).reshape(mask.shape)


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, largest_cc: bool = True, method: str = "auto") -> torch.Tensor:
    """Teacher logits (B, K, *S) -> integer labels (B, *S).

    argmax of the softmax (for K = 2 the same as the official `prob_1 >= 0.5`), then, as the
    official LA code, the largest connected component per sample; for K > 2 each class keeps
    its largest component and the removed voxels become background.
    """
    lab = logits.argmax(1)  # (B, *S)
    if not largest_cc:
        return lab
    out = torch.zeros_like(lab)
    for k in range(1, logits.shape[1]):
        out[largest_component(lab == k, method)] = k
    return out


# ------------------------------------------------------------------------------------------
# Data: the official LA layout, read once, cropped and augmented on the training device.
# ------------------------------------------------------------------------------------------

# Channels-last 3-D layout: 1.5x faster convolutions on CPU (oneDNN) and on recent GPUs
# (measured in benchmark.py). Inputs are converted in VolumeSampler.batch.
MEMORY_FORMAT = torch.channels_last_3d


CASE_FILE = "mri_norm2.h5"
CASES_DIR = "2018LA_Seg_Training Set"
GET_LA = ("get the preprocessed LA data (100 cases, the UA-MT repository's data/ folder) with "
          "`python bcp_minimal.py --download --root {root}`, or copy that folder there")


def read_list(root: Path, name: str) -> list[str]:
    path = root / name
    if not path.is_file():
        raise UserError(f"{path}: list file missing. The official layout has train.list and "
                        f"test.list (one case id per line) in the data root; " + GET_LA.format(root=root))
    cases = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not cases:
        raise UserError(f"{path}: the list is empty; put one case id per line")
    return cases


def load_case(root: Path, case: str, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One case's (image float32, label uint8), checked; every problem names the file."""
    import h5py

    path = root / CASES_DIR / case / CASE_FILE
    if not path.is_file():
        raise UserError(f"{path}: case {case!r} is named in a list but has no file; "
                        "remove it from the list or restore the file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise UserError(f"{path}: no dataset {' or '.join(map(repr, missing))} (found "
                                f"{list(f.keys())}); each case needs 'image' (float) and 'label' (integer)")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()])
    except UserError:
        raise
    except Exception as e:  # h5py raises OSError (and others) on truncated/corrupt files
        raise UserError(f"{path}: cannot read this HDF5 file ({type(e).__name__}: {e}); "
                        "it is corrupt or truncated: re-download or re-create the case") from None
    if image.ndim != 3 or image.shape != label.shape:
        raise UserError(f"{path}: image shape {image.shape} and label shape {label.shape} "
                        "must be the same 3-D shape")
    if not np.isfinite(image).all():
        raise UserError(f"{path}: the image holds NaN or inf values; fix the preprocessing "
                        "(e.g. np.nan_to_num) or drop the case")
    if label.min() < 0 or label.max() >= num_classes:
        raise UserError(f"{path}: label values {np.unique(label)[:10].tolist()} but "
                        f"--num-classes {num_classes} allows 0..{num_classes - 1}; fix the label map")
    return image, label.astype(np.uint8)


def load_split(root, split: str, num_classes: int = 2):
    """All cases of `<split>.list` -> (case ids, images, labels) as numpy arrays."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist; " + GET_LA.format(root=root)
                        + " (or use `--data sample` for the bundled phantoms)")
    cases = read_list(root, f"{split}.list")
    data = [load_case(root, c, num_classes) for c in cases]
    return cases, [d[0] for d in data], [d[1] for d in data]


class VolumeSampler:
    """Random training crops from volumes held in memory (on the training device).

    Each volume is read from disk once. A sample is the official LA augmentation: a random
    90-degree rotation in the (x, y) plane, a random flip along x or y, then a random crop;
    volumes smaller than the patch are zero-padded (as the official RandomCrop does).
    Randomness comes from one torch.Generator, so a resumed run draws the same crops.
    """

    def __init__(self, images, labels, patch, device, generator: torch.Generator):
        self.patch, self.g = tuple(patch), generator
        need = max(patch[0], patch[1])  # rotations swap x and y, so pad both to the larger side
        self.images, self.labels = [], []
        for im, lb in zip(images, labels):
            pads = [max(need - im.shape[0], 0), max(need - im.shape[1], 0), max(patch[2] - im.shape[2], 0)]
            pad_width = [(p // 2, p - p // 2) for p in pads]
            self.images.append(torch.from_numpy(np.pad(im, pad_width)).to(device))
            self.labels.append(torch.from_numpy(np.pad(lb, pad_width)).to(device))

    def __len__(self) -> int:
        return len(self.images)

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.g))

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[index], self.labels[index]
        k, flip_axis = self._randint(4), self._randint(2)  # official RandomRotFlip
        px, py, pz = self.patch
        cx, cy = (py, px) if k % 2 else (px, py)  # crop size before the rotation
        x, y, z = (self._randint(s - c + 1) for s, c in zip(image.shape, (cx, cy, pz)))
        sl = (slice(x, x + cx), slice(y, y + cy), slice(z, z + pz))
        image, label = image[sl], label[sl]
        image = torch.rot90(image, k, (0, 1)).flip(flip_axis)  # (px, py, pz)
        label = torch.rot90(label, k, (0, 1)).flip(flip_axis)
        return image, label

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 1, px, py, pz) float, labels (B, px, py, pz) long."""
        pairs = [self.sample(i) for i in indices]
        images = torch.stack([p[0] for p in pairs])[:, None].contiguous(memory_format=MEMORY_FORMAT)
        return images, torch.stack([p[1] for p in pairs]).long()

    def draw(self, n: int) -> list[int]:
        """n case indices, each pass over the set in a fresh random order (like an epoch)."""
        out = []
        while len(out) < n:
            if not getattr(self, "_queue", None):
                self._queue = torch.randperm(len(self), generator=self.g).tolist()
            out.append(self._queue.pop())
        return out


# ------------------------------------------------------------------------------------------
# Training: stage 1 (labeled copy-paste pre-training), stage 2 (BCP self-training).
# ------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UserError(f"--device {name}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def amp_setup(mode: str, device: torch.device):
    """-> (autocast context factory, GradScaler or None).

    CUDA only: bf16 on GPUs that support it, fp16 with a GradScaler on older ones (Colab's T4).
    Off on CPU and MPS whatever the mode (bf16 autocast gave no speed-up on our CPU and made tiny
    networks diverge there).
    """
    use = mode == "on" or (mode == "auto" and device.type == "cuda")
    if not use or device.type != "cuda":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 (e.g. T4)
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write: a temporary file in the same folder, flushed, then renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                        "it is truncated or foreign. Use a file written by bcp_minimal "
                        "(ckpt_last.pt / final.pt in a run folder)") from None
    if not isinstance(state, dict) or state.get("format") != "bcp_minimal/1" or "model" not in state:
        raise UserError(f"{path}: not a bcp_minimal checkpoint (no 'format': 'bcp_minimal/1' "
                        "entry); use a file written by this program")
    return state


LOG_FIELDS = ["stage", "iter", "lr", "loss", "loss_ce", "loss_dice", "loss_in", "loss_out"]


def train(cfg: Config, resume: bool = False, progress: bool = True, on_log=None) -> dict:
    """Train per cfg into cfg.out; returns {"model": student, "teacher": teacher or None, "cfg": cfg}.

    method "bcp": stage "pretrain" (cfg.pretrain_iters) then stage "selftrain"
    (cfg.selftrain_iters) with a teacher copied from the pre-trained student and a fresh
    optimizer, as the official LA script. method "sup": one stage "sup" of
    pretrain_iters + selftrain_iters iterations, plain crops, labeled data only.
    on_log(stage, iteration, model, rows) is called after every log flush (notebooks draw
    live curves with it); rows are the new log lines as dicts.
    """
    check_config(cfg)
    out = Path(cfg.out)
    ckpt_path = out / "ckpt_last.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint {ckpt_path}; start the run without --resume")
        state = load_checkpoint(ckpt_path)
        keep = {k: getattr(cfg, k) for k in ("device", "amp", "root", "out")}
        cfg = Config(**{**state["cfg"], **keep})
        cfg.patch, cfg.eval_stride = tuple(cfg.patch), tuple(cfg.eval_stride)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # every random draw of the run comes from g

    cases, images, labels = load_split(cfg.root, "train", cfg.num_classes)
    if cfg.labeled > len(cases):
        raise UserError(f"--labeled {cfg.labeled}: {Path(cfg.root) / 'train.list'} has only "
                        f"{len(cases)} cases; use --labeled {len(cases) - 1} or fewer")
    if cfg.method == "bcp" and cfg.labeled == len(cases):
        raise UserError(f"--labeled {cfg.labeled}: every case of train.list is labeled, BCP needs "
                        "unlabeled cases; lower --labeled or use --method sup")
    lab = VolumeSampler(images[: cfg.labeled], labels[: cfg.labeled], cfg.patch, device, g)
    unl = VolumeSampler(images[cfg.labeled:], labels[cfg.labeled:], cfg.patch, device, g)
    del images, labels

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    autocast, scaler = amp_setup(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    stages = ([("pretrain", cfg.pretrain_iters), ("selftrain", cfg.selftrain_iters)]
              if cfg.method == "bcp" else [("sup", cfg.pretrain_iters + cfg.selftrain_iters)])
    model = UNet(1, cfg.num_classes, cfg.width).to(device, memory_format=MEMORY_FORMAT)
    teacher = None
    log_rows: list[dict] = []
    start_stage, start_iter = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        start_stage = [s for s, _ in stages].index(state["stage"])
        start_iter = state["iter"]
        g.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        lab._queue, unl._queue = state["rng"]["queues"]
        log_rows = _read_log(out / "log.csv", state["stage"], start_iter)
    # The log restarts from the checkpoint's rows, written atomically like a checkpoint.
    tmp = out / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(log_rows)
    os.replace(tmp, out / "log.csv")
    log_file = open(out / "log.csv", "a", newline="")
    writer = csv.DictWriter(log_file, LOG_FIELDS)

    for si, (stage, iters) in enumerate(stages):
        if si < start_stage:
            continue
        resuming_here = state is not None and si == start_stage
        if stage == "selftrain":
            teacher = copy.deepcopy(model)  # θ_t ← θ_s of the pre-trained student
            for p in teacher.parameters():
                p.requires_grad_(False)
            if resuming_here and state.get("teacher") is not None:
                teacher.load_state_dict(state["teacher"])
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        if resuming_here:
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        first = start_iter + 1 if resuming_here else 1
        step_fn = _make_step(cfg, stage, model, teacher, lab, unl, g, device, autocast)
        _run_stage(cfg, stage, iters, first, model, teacher, optimizer, scaler, step_fn, g,
                   lab, unl, writer, log_file, ckpt_path, progress, on_log)
        if stage == "pretrain":
            save_checkpoint(out / "pretrain.pt", _state(cfg, stage, iters, model, None, optimizer, scaler, g, lab, unl))
    log_file.close()
    save_checkpoint(out / "final.pt", _state(cfg, stages[-1][0], stages[-1][1], model, teacher,
                                             None, None, g, lab, unl))
    return {"model": model, "teacher": teacher, "cfg": cfg}


def _read_log(path: Path, stage: str, it: int) -> list[dict]:
    """Log rows up to (stage, iteration) of the checkpoint: a resumed run re-logs the rest."""
    if not path.is_file():
        return []
    rows = list(csv.DictReader(open(path)))
    order = {"pretrain": 0, "selftrain": 1, "sup": 0}
    return [r for r in rows if (order[r["stage"]], int(r["iter"])) <= (order[stage], it)]


def _state(cfg, stage, it, model, teacher, optimizer, scaler, g, lab, unl) -> dict:
    return {
        "format": "bcp_minimal/1", "cfg": dataclasses.asdict(cfg), "stage": stage, "iter": it,
        "model": model.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"data": g.get_state(), "torch": torch.get_rng_state(),
                "queues": (list(getattr(lab, "_queue", None) or []), list(getattr(unl, "_queue", None) or []))},
    }


def _make_step(cfg, stage, model, teacher, lab, unl, g, device, autocast):
    """The loss of one iteration of `stage` -> (loss, dict of detached terms)."""
    nl = cfg.batch_size // 2  # labeled images per batch (official labeled_bs = 4 of 8)
    h = nl // 2  # images per half of a mix (official sub_bs)
    net = torch.compile(model) if cfg.compile and device.type == "cuda" else model

    def sup_step():
        x, y = lab.batch(lab.draw(nl))  # (nl, 1, *P), (nl, *P)
        with autocast():
            logits = net(x)
        loss = seg_loss(logits, y)
        return loss, {"loss": loss}

    def pretrain_step():
        # Copy-paste between labeled images: x = x_a ⊙ M + x_b ⊙ (1 − M), same for labels.
        x, y = lab.batch(lab.draw(nl))
        M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, device)  # (*P)
        x_mix, y_mix = mix(x[:h], x[h:], M), mix(y[:h], y[h:], M)  # (h, 1, *P), (h, *P)
        with autocast():
            logits = net(x_mix)
        ce = masked_ce(logits, y_mix, torch.ones_like(M))
        dice = masked_dice_loss(logits, y_mix, torch.ones_like(M))
        loss = (ce + dice) / 2  # official pre-training loss
        return loss, {"loss": loss, "loss_ce": ce, "loss_dice": dice}

    def selftrain_step():
        x, y = lab.batch(lab.draw(nl))  # labeled (nl, 1, *P)
        u, _ = unl.batch(unl.draw(nl))  # unlabeled, its labels are never used
        x_a, x_b, y_a, y_b, u_a, u_b = x[:h], x[h:], y[:h], y[h:], u[:h], u[h:]
        with torch.no_grad():
            teacher.train(cfg.teacher_mode == "train")
            with autocast():
                t_logits = teacher(u)  # (nl, K, *P)
            p = pseudo_label(t_logits, cfg.pseudo_lcc)  # (nl, *P) integer
            p_a, p_b = p[:h], p[h:]
            M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, device)  # (*P): 0 in the box
        # X_in = X_l ⊙ M + X_u ⊙ (1 − M): unlabeled box inside a labeled image, and the reverse.
        x_in, x_out = mix(x_a, u_a, M), mix(u_b, x_b, M)  # (h, 1, *P) each
        # Their labels Y_in = mix(y_a, p_a, M), Y_out = mix(p_b, y_b, M) are never built whole:
        # bcp_loss reads each part in its own region, where it carries its own weight.
        with autocast():
            q = net(torch.cat([x_in, x_out]))  # both mixes in one forward: (2h, K, *P)
        q_in, q_out = q[:h], q[h:]
        # L_in  = L_seg(Q_in,  Y_l) ⊙ M + α L_seg(Q_in,  P_u) ⊙ (1 − M)
        # L_out = α L_seg(Q_out, P_u) ⊙ M + L_seg(Q_out, Y_l) ⊙ (1 − M)
        loss_in = bcp_loss(q_in, y_a, p_a, M, 1.0, cfg.alpha)
        loss_out = bcp_loss(q_out, p_b, y_b, M, cfg.alpha, 1.0)
        loss = loss_in + loss_out
        return loss, {"loss": loss, "loss_in": loss_in, "loss_out": loss_out}

    return {"sup": sup_step, "pretrain": pretrain_step, "selftrain": selftrain_step}[stage]


def stage_lr(cfg: Config, it: int, iters: int) -> float:
    """Learning rate of iteration `it` (1-based) of a stage of `iters` iterations."""
    if cfg.lr_schedule == "poly":
        return cfg.lr * (1 - (it - 1) / iters) ** 0.9  # poly decay to ~0 at the stage's end
    return cfg.lr * 0.1 ** ((it - 1) // cfg.lr_step)  # official: ×0.1 every lr_step iterations


def _run_stage(cfg, stage, iters, first, model, teacher, optimizer, scaler, step_fn, g, lab, unl,
               writer, log_file, ckpt_path, progress, on_log=None):
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(first, iters + 1), desc=stage, disable=not progress, leave=True,
               initial=first - 1, total=iters)
    pending = []  # per-iteration detached loss terms, flushed to the CSV every log_every iterations
    for it in bar:
        lr = stage_lr(cfg, it, iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, terms = step_fn()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if teacher is not None:
            ema_update(teacher, model, cfg.ema_decay)  # once per iteration, after the student step
        pending.append((it, lr, {k: v.detach() for k, v in terms.items()}))
        if it % cfg.log_every == 0 or it == iters:
            # The only host sync of the loop: turn the pending terms into numbers.
            values = torch.stack([torch.stack(list(t.values())) for _, _, t in pending]).float().cpu()
            rows = []
            for (i, lr_i, t), row in zip(pending, values.tolist()):
                named = dict(zip(t.keys(), row))
                bad = [k for k, v in named.items() if not math.isfinite(v)]
                if bad:
                    log_file.flush()
                    raise UserError(
                        f"non-finite loss at {stage} iteration {i} (terms: {', '.join(bad)}); "
                        f"the run stopped and the last good checkpoint {ckpt_path} is kept. "
                        "Lower --lr, try --amp off, or check the data for extreme values")
                rows.append({"stage": stage, "iter": i, "lr": lr_i, **named})
            writer.writerows(rows)
            log_file.flush()
            bar.set_postfix(loss=f"{values[-1, 0]:.4f}")
            pending = []
            if it % cfg.ckpt_every == 0 or it == iters:
                save_checkpoint(ckpt_path, _state(cfg, stage, it, model, teacher, optimizer, scaler, g, lab, unl))
            if on_log is not None:
                on_log(stage, it, model, rows)
                model.train()  # the callback may have evaluated the model
    bar.close()


# ------------------------------------------------------------------------------------------
# Evaluation: sliding windows over whole volumes, and the four metrics of the paper.
# ------------------------------------------------------------------------------------------


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis, as the official test: ceil((size - patch) / stride) + 1
    windows every `stride` voxels, the last one moved back to end flush with the border."""
    n = math.ceil(max(size - patch, 0) / stride) + 1
    return sorted({min(i * stride, size - patch) for i in range(n)})


@torch.no_grad()
def sliding_window_predict(model: nn.Module, image: torch.Tensor, patch, stride, batch: int = 4,
                           autocast=contextlib.nullcontext) -> torch.Tensor:
    """Class probabilities (K, *S) for a whole volume image (C, *S) by averaging windows.

    As the official test: pad to at least the patch, windows every `stride` voxels (the last
    one flush with the border), softmax of each window added up and divided by the count.
    Windows go through the model `batch` at a time. The model is used as it is: call
    model.eval() first.
    """
    device = next(model.parameters()).device
    image = image.to(device).float()
    S = image.shape[1:]
    pads = [max(p - s, 0) for p, s in zip(patch, S)]
    pad_arg = []
    for p in reversed(pads):  # F.pad wants the last axis first
        pad_arg += [p // 2, p - p // 2]
    x = F.pad(image, pad_arg)  # (C, *S') with S' >= patch
    Sp = x.shape[1:]
    starts = [window_starts(s, p, st) for s, p, st in zip(Sp, patch, stride)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    probs, count = None, torch.zeros(Sp, device=device)
    for i in range(0, len(corners), batch):
        chunk = corners[i: i + batch]
        windows = torch.stack([x[:, a: a + patch[0], b: b + patch[1], c: c + patch[2]] for a, b, c in chunk])
        with autocast():
            p = model(windows).float().softmax(1)  # (n, K, *patch)
        if probs is None:
            probs = torch.zeros((p.shape[1], *Sp), device=device)
        for (a, b, c), pw in zip(chunk, p):
            probs[:, a: a + patch[0], b: b + patch[1], c: c + patch[2]] += pw
            count[a: a + patch[0], b: b + patch[1], c: c + patch[2]] += 1
    probs = probs / count
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, S))
    return probs[(slice(None), *crop)]  # (K, *S)


def _borders(a: np.ndarray, b: np.ndarray):
    """Surface voxels of a and b (object minus its erosion with the face-connected structure,
    medpy's definition), cropped to the bounding box of a | b plus a 1-voxel margin. Distances
    between the surfaces are the same in the crop, and the EDT of a small organ in a large
    volume gets much cheaper."""
    from scipy import ndimage

    nz = np.nonzero(a | b)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in nz)
    a, b = a[box], b[box]
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    return a ^ ndimage.binary_erosion(a, structure), b ^ ndimage.binary_erosion(b, structure)


def _distances(from_border: np.ndarray, to_border: np.ndarray, spacing) -> np.ndarray:
    """Euclidean distance from every voxel of from_border to the nearest voxel of to_border."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~to_border, sampling=spacing)[from_border]


def surface_metrics(pred, gt, spacing=None) -> tuple[float, float]:
    """(hd95, asd) with two distance transforms instead of the three that separate medpy calls
    need. Empty masks: see hd95."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if not pred.any() or not gt.any():
        worst = 0.0 if not pred.any() and not gt.any() else _worst_distance(pred.shape, spacing)
        return worst, worst
    pb, gb = _borders(pred, gt)
    d_pg = _distances(pb, gb, spacing)  # prediction surface -> ground-truth surface
    d_gp = _distances(gb, pb, spacing)
    return float(np.percentile(np.hstack([d_pg, d_gp]), 95)), float(d_pg.mean())


def _worst_distance(shape, spacing) -> float:
    """The largest distance possible inside the volume: its diagonal (used for empty masks)."""
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    return float(np.sqrt((((np.asarray(shape) - 1) * spacing) ** 2).sum()))


def dice(pred, gt, spacing=None) -> float:
    """2|P∩G| / (|P| + |G|), 0 when both are empty (as medpy.metric.binary.dc)."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    denom = pred.sum() + gt.sum()
    return float(2 * (pred & gt).sum() / denom) if denom else 0.0


def jaccard(pred, gt, spacing=None) -> float:
    """|P∩G| / |P∪G|, 0 when both are empty (as medpy.metric.binary.jc)."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 0.0


def hd95(pred, gt, spacing=None) -> float:
    """95th percentile of the symmetric surface distances (as medpy.metric.binary.hd95).

    medpy raises on an empty mask and the official code then scores 0, a *perfect* value.
    Here an empty prediction (or empty ground truth with a non-empty prediction) scores the
    volume's diagonal, the worst distance possible; both empty scores 0.
    """
    return surface_metrics(pred, gt, spacing)[0]


def asd(pred, gt, spacing=None) -> float:
    """Mean distance from the prediction's surface to the ground truth's (as medpy's asd,
    which is one-directional; the symmetric version is medpy's assd). Empty masks as hd95."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if not pred.any() or not gt.any():
        return surface_metrics(pred, gt, spacing)[1]
    pb, gb = _borders(pred, gt)
    return float(_distances(pb, gb, spacing).mean())


def evaluate(model: nn.Module, cfg: Config, out=None, progress: bool = True) -> dict:
    """Score `model` on test.list; writes metrics.json (and a PNG of the first case) to out."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    autocast, _ = amp_setup(cfg.amp, device)
    cases, images, labels = load_split(cfg.root, "test", cfg.num_classes)
    model.eval()
    rows, shown = [], None
    for case, image, label in tqdm(list(zip(cases, images, labels)), desc="test", disable=not progress):
        probs = sliding_window_predict(model, torch.from_numpy(image)[None], cfg.patch, cfg.eval_stride,
                                       autocast=autocast)
        pred = probs.argmax(0)
        if cfg.eval_lcc:
            pred = largest_component((pred == 1)[None])[0].long()
        pred = pred.cpu().numpy().astype(np.uint8)
        gt = label == 1
        h95, mean_sd = surface_metrics(pred, gt)
        rows.append({"case": case, "dice": dice(pred, gt), "jaccard": jaccard(pred, gt), "hd95": h95, "asd": mean_sd})
        if shown is None:
            shown = (image, label, pred)
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "jaccard", "hd95", "asd")}
    metrics["cases"] = rows
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_overlay(out / "prediction.png", *shown, title=f"{cases[0]}  Dice {rows[0]['dice']:.3f}")
    return metrics


def plot_slices(image, overlays: dict | None = None, center=None, title: str = ""):
    """A matplotlib Figure: one row per entry (image alone, then each overlay on the image),
    three orthogonal slices through `center` (default: the first overlay's centre of mass).

    overlays maps a row name to an integer/boolean volume of the image's shape. Built without
    pyplot, so it neither changes the backend nor needs a display.
    """
    from matplotlib.figure import Figure

    overlays = overlays or {}
    if center is None:
        first = next(iter(overlays.values()), None)
        center = ([int(i.mean()) for i in np.nonzero(first)] if first is not None and first.any()
                  else [s // 2 for s in image.shape])
    rows = [("image", None)] + list(overlays.items())
    fig = Figure(figsize=(9, 3 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, vol) in enumerate(rows):
        for axis, ax in enumerate(axes[r]):
            ax.imshow(np.take(image, center[axis], axis=axis).T, cmap="gray", origin="lower")
            if vol is not None:
                sl = np.take(np.asarray(vol), center[axis], axis=axis)
                ax.imshow(np.ma.masked_equal(sl, 0).T, cmap="autumn", alpha=0.6, origin="lower",
                          vmin=0, vmax=max(int(np.max(vol)), 1))
            ax.set_title(f"{name}, {'xyz'[axis]} = {center[axis]}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_overlay(path, image, label, pred, title: str = "") -> None:
    """PNG of image / ground truth / prediction slices through the label's centre."""
    plot_slices(image, {"ground truth": label, "prediction": pred}, title=title).savefig(path, dpi=80)


# ------------------------------------------------------------------------------------------
# Synthetic data (data_samples/) and the real LA download.
# ------------------------------------------------------------------------------------------


def make_phantom(shape=(48, 48, 32), rng: np.random.Generator | None = None):
    """One synthetic 'left atrium' scan -> (image float32, label uint8).

    The target is an ellipsoid with 2-3 tubes ('pulmonary veins') leaving it. Beside it lie
    distractors of the *same* brightness: a long cylinder ('aorta') touching it and a smaller
    ball ('ventricle'). Intensity alone cannot separate them; shape and context must.
    A smooth bias field and noise make every scan different.
    """
    rng = rng or np.random.default_rng(0)
    X, Y, Z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    S = np.asarray(shape, np.float32)

    def ellipsoid(c, r):
        return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1

    def tube(p0, p1, radius):
        d = p1 - p0
        t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / (d @ d), 0, 1)
        return (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2 <= radius**2

    centre = S * rng.uniform(0.35, 0.65, 3)
    radii = S * rng.uniform([0.10, 0.09, 0.12], [0.22, 0.2, 0.26])
    target = ellipsoid(centre, radii)
    for _ in range(rng.integers(2, 4)):  # veins leave the atrium away from the distractors
        direction = rng.normal(size=3) * [1, 1, 0.5]
        direction[0] = -abs(direction[0])
        direction /= np.linalg.norm(direction)
        target |= tube(centre, centre + direction * S.max() * 0.45, rng.uniform(1.2, 2.5))
    aorta_x = centre[0] + radii[0] + rng.uniform(0.0, 2.5)  # touching the atrium's +x side
    p0 = np.array([aorta_x, centre[1] + rng.uniform(-5, 5), 0.0])
    p1 = np.array([aorta_x + rng.uniform(-4, 4), centre[1] + rng.uniform(-5, 5), S[2] - 1])
    aorta = tube(p0, p1, rng.uniform(2.5, 5)) & ~target
    ball_c = centre + np.array([radii[0] + 5, -(radii[1] + 5), rng.uniform(-3, 3)])
    ventricle = ellipsoid(ball_c, rng.uniform(3.5, 7.5, 3)) & ~target

    # Scanner variation: every case has its own contrast, noise level and bias field, so two
    # labeled cases cannot show the network everything the unlabeled ones will.
    body = ellipsoid(S / 2, S * rng.uniform(0.42, 0.5))
    bright = rng.uniform(0.3, 0.9)
    img = rng.uniform(0.05, 0.25) * body + bright * (target | aorta | ventricle)
    bias = 1 + rng.uniform(0.1, 0.4) * np.sin(X / S[0] * rng.uniform(2, 4) + rng.uniform(0, 6)) \
        * np.cos(Y / S[1] * rng.uniform(2, 4) + rng.uniform(0, 6))
    img = img * bias + rng.normal(0, rng.uniform(0.08, 0.25), shape)
    img = (img - img.mean()) / img.std()  # zero mean, unit variance, as the LA preprocessing
    img = np.round(img * 16) / 16  # quantised so that the HDF5 files compress well
    return img.astype(np.float32), target.astype(np.uint8)


def make_sample_data(root="data_samples", n_train: int = 16, n_test: int = 4,
                     shape=(48, 48, 32), seed: int = 0) -> Path:
    """Write synthetic phantoms in the official LA layout (same loader as the real data)."""
    import h5py

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"PHANTOM{i:03d}" for i in range(n_train + n_test)]
    for name in names:
        image, label = make_phantom(shape, rng)
        d = root / CASES_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        with h5py.File(d / CASE_FILE, "w") as f:
            f.create_dataset("image", data=image, compression="gzip", shuffle=True)
            f.create_dataset("label", data=label, compression="gzip", shuffle=True)
    (root / "train.list").write_text("\n".join(names[:n_train]) + "\n")
    (root / "test.list").write_text("\n".join(names[n_train:]) + "\n")
    return root


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
                            "pass another base URL with --download-url") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise UserError(f"download {url}: cannot connect ({getattr(e, 'reason', e)}); are you "
                            "offline? Re-run --download later: finished files are kept") from None
        os.replace(tmp, dest)

    lists = {}
    for name in ("train.list", "test.list"):
        fetch(name, root / name)
        lists[name] = read_list(root, name)
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
                            "and 'label'); removed it, re-run --download to try again")
    return root


# ------------------------------------------------------------------------------------------
# Command line: every Config field is a flag; presets set the defaults.
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Bidirectional Copy-Paste (CVPR 2023) for semi-supervised 3-D segmentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="sample", choices=sorted(PRESETS),
                   help="preset that sets every default below")
    for f in dataclasses.fields(Config):
        if f.name == "data":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("tuple",) or isinstance(f.default, tuple):
            p.add_argument(flag, type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=_bool, default=None, metavar="true|false")
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--eval", metavar="CKPT", help="evaluate a checkpoint on test.list, no training")
    p.add_argument("--download", action="store_true", help="fetch the 100 preprocessed LA cases into --root")
    p.add_argument("--download-url", default=LA_URL, help="mirror holding the UA-MT data/ folder")
    p.add_argument("--make-samples", action="store_true", help="(re)write the synthetic data_samples/")
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def config_from_checkpoint(state: dict, given: dict) -> Config:
    saved = state["cfg"]
    return make_config(saved["data"], **{**{k: v for k, v in saved.items() if k != "data"}, **given})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if f.name != "data" and getattr(args, f.name) is not None}
    try:
        cfg = make_config(args.data, **given)
        if args.make_samples:
            print(f"wrote {make_sample_data(cfg.root)}")
            return 0
        if args.download:
            download_la(cfg.root, args.download_url)
            print(f"LA data ready in {cfg.root}")
            return 0
        if cfg.data == "sample" and not Path(cfg.root).is_dir() and cfg.root == "data_samples":
            make_sample_data(cfg.root)  # the bundled data, regenerated if it was deleted
        if args.resume and (Path(cfg.out) / "ckpt_last.pt").is_file():
            # the run's own config, with the flags given now on top (train keeps only
            # --device, --amp, --root and --out of them: the method cannot change mid-run)
            cfg = config_from_checkpoint(load_checkpoint(Path(cfg.out) / "ckpt_last.pt"), given)
        if args.eval:
            state = load_checkpoint(args.eval)
            cfg = config_from_checkpoint(state, given)
            if "out" not in given:  # never overwrite the run's own metrics.json
                cfg.out = str(Path(args.eval).parent / f"eval_{Path(args.eval).stem}")
            check_config(cfg)
            model = UNet(1, cfg.num_classes, cfg.width)
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as e:
                raise UserError(f"{args.eval}: weights do not fit UNet(width={cfg.width}): {str(e)[:200]}") from None
            model.to(pick_device(cfg.device))
            metrics = evaluate(model, cfg, out=cfg.out)
        else:
            t0 = time.time()
            result = train(cfg, resume=args.resume)
            cfg = result["cfg"]
            t_train = time.time() - t0
            metrics = evaluate(result["model"], cfg, out=cfg.out)
            metrics["train_seconds"] = round(t_train, 1)
            (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.method} on {cfg.root} ({len(metrics['cases'])} test cases): Dice {metrics['dice']:.4f}  "
          f"Jaccard {metrics['jaccard']:.4f}  95HD {metrics['hd95']:.2f}  ASD {metrics['asd']:.2f}  "
          f"-> {Path(cfg.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
