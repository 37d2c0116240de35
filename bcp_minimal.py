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
The data side (files, normalising, crops) is get_data.py beside this file; plots.py draws.
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

# The data side: files, normalising, crops (it imports no project file). UserError: bad input,
# one line, no traceback, exit 2. The other names are re-exported for the notebooks.
import get_data as gd
from get_data import CASE_FILE, CASES_DIR, UserError, VolumeSampler, load_case, load_split  # noqa

# 1. The network: a plain U-Net (the paper: V-Net; BCP works with any encoder-decoder) -------

class ConvBlock(nn.Sequential):  # (conv 3^d -> BatchNorm -> ReLU) x n
    def __init__(self, cin, cout, dims, n=2):
        Conv, Norm = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        super().__init__(*[layer for i in range(n) for layer in (
            Conv(cout if i else cin, cout, 3, padding=1, bias=False), Norm(cout), nn.ReLU(True))])

class UNet(nn.Module):
    """U-Net, 4 poolings, widths w..16w: (B, C, *S) -> logits (B, K, *S); sides divide by 16.
    Deviation: official LA uses a V-Net; the LA presets take its choices where they cost most
    (docs/choices.md): `dropout` 0.5 at its two places (bottleneck, last features), top_convs=1
    (one convolution in each full-resolution block), skip="add" (decoder blocks sum encoder and
    upsampled features, half the channels in). Official ACDC's UNet_2d: LeakyReLU, bilinear
    upsampling, encoder dropout 0.05-0.5 (the ACDC presets: none; measured in docs/choices.md)."""

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

def bcp_mask(spatial_shape, beta=2 / 3, center=False, generator=None, device=None, shape="box"):
    """The mask M (float, `spatial_shape`): 1 except a 0-box of int(s * beta) voxels per axis,
    its corner uniform in [0, s - size) as the official code (whose range is hard-coded for its
    112 x 112 x 80 patch); center=True: the paper's "zero-centred" box. The paper's other shapes
    (Table 6; the official random_mask, concate_mask / contact_mask), about the box's share of
    zeros: "cubes", a 3 x 3 (x 3) grid, one block of int(s * beta / 3) per cell at a random place
    in it; "slab", all of every axis but one (3-D: z, 2-D: x), across it that share of s."""
    S, draw = tuple(spatial_shape), lambda n: int(torch.randint(0, n, (1,), generator=generator))
    M, sizes = torch.ones(S, device=device), [int(s * beta) for s in S]
    if shape == "cubes":
        cell, side = [s // 3 for s in S], [max(int(s * beta / 3), 1) for s in S]
        for idx in itertools.product(range(3), repeat=len(S)):  # one block per grid cell
            corner = [i * c + draw(c - k + 1) for i, c, k in zip(idx, cell, side)]
            M[tuple(slice(a, a + k) for a, k in zip(corner, side))] = 0
        return M
    if shape == "slab":  # 3-D, beta = 2/3: 8/27 of z (the paper's "contact" mask)
        axis, share = len(S) - 1 if len(S) == 3 else 0, math.prod(sizes) / math.prod(S)
        sizes = [max(int(s * share), 1) if i == axis else s for i, s in enumerate(S)]
    box = []
    for s, size in zip(S, sizes):  # size < s for beta < 1: the range below is never empty
        start = (s - size) // 2 if center or size == s else draw(s - size)
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
    """Soft Dice where region == 1, every class, per sample (official LA mask_DiceLoss; an
    early official ACDC DiceLoss took background over the whole image, fixed in 2023-10).
    target (B, *S), region (*S) or (B, *S):
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
    """Stage 1, labeled copy-paste: x = x_a M + x_b (1 - M), labels alike (--pretrain-mix false:
    x_a into itself, a plain crop, the same draws). Deviation: the official sampler pairs distinct
    cases; here a case can meet itself when the labeled cases are fewer than, or no multiple of,
    batch_size/2."""
    x, y = lab.batch(lab.draw(cfg.batch_size // 2))  # (2h, 1, *P), (2h, *P)
    h = len(x) // 2
    b = slice(h, None) if cfg.pretrain_mix else slice(None, h)  # x_b, or x_a again
    M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, x.device, cfg.mask_shape)  # (*P)
    return {"x": mix(x[:h], x[b], M), "y": mix(y[:h], y[b], M), "M": M}

# Self-training's two mixes, mix(outer, inner, M), one per forward, for each --direction (paper
# Table 4). x: labeled crops (ground truth y, weight 1); u: unlabeled (pseudo-labels p, alpha).
# "none" pastes each crop into itself: plain crops, the same region-split loss and weights.
DIRECTIONS = {"both": (("x_a", "u_a"), ("u_b", "x_b")),  # X_in, X_out: the paper
              "in": (("x_a", "u_a"), ("x_b", "u_b")),  # X_in twice
              "out": (("u_a", "x_a"), ("u_b", "x_b")),  # X_out twice
              "within": (("x_a", "x_b"), ("u_a", "u_b")),  # each kind into its own kind
              "none": (("x_a", "x_a"), ("u_a", "u_a"))}  # no copy-paste: a Mean Teacher

@torch.no_grad()
def selftrain_batch(lab, unl, teacher, cfg, g):
    """Stage 2: teacher pseudo-labels, then two mixes (DIRECTIONS; both: X_in, X_out) -> x_in,
    x_out (h, 1, *P), labels y_in, y_out (h, *P), M, and for bcp_loss targets_in, targets_out
    = (outer target, inner target, outer weight, inner weight)."""
    x, y = lab.batch(lab.draw(cfg.batch_size // 2))  # labeled (2h, 1, *P), (2h, *P)
    u, _ = unl.batch(unl.draw(cfg.batch_size // 2))  # unlabeled (labels: None, never held)
    h = len(x) // 2
    teacher.train()  # official: a train-mode teacher (BatchNorm of the batch, dropout on), two
    # forwards of h images (BatchNorm statistics per half)
    p = torch.cat([pseudo_label(teacher(u[:h]), cfg.pseudo_lcc),
                   pseudo_label(teacher(u[h:]), cfg.pseudo_lcc)])  # (2h, *P)
    M = bcp_mask(cfg.patch, cfg.beta, cfg.mask_center, g, x.device, cfg.mask_shape)  # (*P)
    crops = {"x_a": (x[:h], y[:h], 1.0), "x_b": (x[h:], y[h:], 1.0),  # (image, target, weight)
             "u_a": (u[:h], p[:h], cfg.alpha), "u_b": (u[h:], p[h:], cfg.alpha)}
    b = {"M": M, "y_a": y[:h], "y_b": y[h:], "p_a": p[:h], "p_b": p[h:]}
    for name, (outer, inner) in zip(("in", "out"), DIRECTIONS[cfg.direction]):  # 1st, 2nd mix
        (xo, yo, wo), (xi, yi, wi) = crops[outer], crops[inner]
        b[f"x_{name}"], b[f"y_{name}"] = mix(xo, xi, M), mix(yo, yi, M)
        b[f"targets_{name}"] = (yo, yi, wo, wi)
    return b

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
    (yo, yi, wo, wi), (zo, zi, vo, vi) = b["targets_in"], b["targets_out"]
    loss_in = bcp_loss(q_in, yo, yi, b["M"], wo, wi)  # both: (y_a, p_a, M, 1, alpha)
    loss_out = bcp_loss(q_out, zo, zi, b["M"], vo, vi)  # both: (p_b, y_b, M, alpha, 1)
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
        p.grad /= run.world  # own forwards of batch_size/4 images, as the official 1-GPU code)
    run.scaler.step(run.optimizer) if run.scaler else run.optimizer.step()
    if run.scaler:
        run.scaler.update()
    if run.teacher is not None:  # BCP self-training (sup has no teacher)
        ema_update(run.teacher, run.model, run.cfg.ema_decay)  # every iteration
    return {k: v.detach() for k, v in terms.items()}

# 6. Training: config and presets, stage 1 (pre-training), stage 2 (self-training) -----------

def _f(default, help, choices=None, type=int):  # a Config field with its --help line
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "type": type})  # type: of a tuple's items

@dataclasses.dataclass
class Config:
    data: str = _f("sample", "preset that sets every default",
                   ["sample", "LA", "LA_half", "ACDC", "ACDC_cpu", "Pancreas"])
    root: str = _f("data_samples", "data folder in the official LA or the ACDC (SSL4MIS) layout")
    labeled: int = _f(2, "the first N cases of train.list are labeled (ACDC: N patients)")
    method: str = _f("bcp", "bcp, or sup: labeled crops alone, BCP's stages and lr", ["bcp", "sup"])
    pretrain_iters: int = _f(200, "stage 1 iterations (labeled copy-paste)")
    selftrain_iters: int = _f(600, "stage 2 iterations (BCP self-training)")
    patch: tuple = _f((32, 32, 32), "training crop X Y Z (2-D: X Y), sides multiples of 16")
    batch_size: int = _f(8, "crops drawn per iteration: half labeled, half unlabeled (stage 1, "
                         "sup: the labeled half)")
    width: int = _f(8, "U-Net base width (channels of the first level)")
    top_convs: int = _f(2, "convolutions per full-resolution block: 2, or 1 (V-Net)", [1, 2])
    skip: str = _f("concat", "skip connections: concat, or add (V-Net)", ["concat", "add"])
    dropout: float = _f(0.0, "channel dropout on the bottleneck and last features (official 0.5)")
    rotate: int = _f(0, "0: official LA's turn + flip; R: official ACDC's, angles in [-R, R)")
    num_classes: int = _f(2, "classes including background")
    class_names: tuple = _f((), "foreground class names (default: LA; RV Myo LV; 1 2 ..)", type=str)
    norm: str = _f("zscore", "scan intensities: zscore (MR), minmax, ct (--window)", gd.NORMS)
    window: tuple = _f(gd.CT_WINDOW, "ct: the HU window LOW HIGH mapped to [0, 1]", type=float)
    spacing: tuple = _f((), "mm per voxel X Y Z of the cases (--predict: NIfTI resampled to it)",
                        type=float)
    alpha: float = _f(0.5, "weight of the pseudo-labeled region of each mix (paper: 0.5)")
    beta: float = _f(2 / 3, "box side / crop side of the mask (paper: 2/3)")
    mask_center: bool = _f(False, "centre the box (default: a random place, as official)")
    mask_shape: str = _f("box", "ablation, paper Table 6: the mask's zeros as a box, small cubes,"
                         " or a slab", ["box", "cubes", "slab"])
    direction: str = _f("both", "ablation, paper Table 4: copy-paste both ways, in, out, within "
                        "each kind, or none", list(DIRECTIONS))
    pretrain_mix: bool = _f(True, "copy-paste in pre-training (ablation, paper Table 9)")
    ema_decay: float = _f(0.99, "Mean-Teacher EMA decay (the paper's lambda), every iteration")
    pseudo_lcc: bool = _f(True, "keep the largest component of pseudo-labels (official)")
    lr: float = _f(0.01, "SGD learning rate; momentum 0.9, weight decay 1e-4 (official)")
    lr_step: int = _f(2500, "self-training lr x0.1 every N iterations (official LA: 2500)")
    seed: int = _f(1337, "seed of every random draw (official: 1337)")
    eval_split: str = _f("test", "NAME.list scored after training and by --eval (none: none)")
    eval_stride: tuple = _f((16, 16, 16), "sliding-window stride X Y Z at evaluation")
    eval_lcc: bool = _f(True, "keep the largest component of the prediction (official)")
    eval_model: str = _f("student", "weights scored: student, teacher, ensemble (mean softmax)",
                         ["student", "teacher", "ensemble"])
    eval_tta: bool = _f(False, "test-time augmentation: 4 mirror images in x, y (official: none)")
    device: str = _f("auto", "auto (cuda, mps, then cpu) | cpu | cuda | mps")
    amp: str = _f("auto", "autocast; auto: amp_dtype's measured choice", ["auto", "on", "off"])
    out: str = _f("runs/sample", "run folder: config, log, checkpoints, metrics")
    log_every: int = _f(20, "iterations between log lines (host syncs)")
    ckpt_every: int = _f(200, "iterations between checkpoints, a multiple of --log-every")

PRESETS = {
    "sample": dict(lr_step=300),  # the phantoms, minutes on a CPU; lr x0.1 halfway (README)
    "LA": dict(root="data/LA", labeled=4, pretrain_iters=2000, selftrain_iters=15000,  # paper
               patch=(112, 112, 80), width=16, top_convs=1, skip="add", dropout=0.5,
               eval_stride=(18, 18, 4), out="runs/LA", log_every=50, ckpt_every=500),
    "LA_half": dict(root="data/LA_half", labeled=4, pretrain_iters=1200, selftrain_iters=2400,
                    patch=(64, 64, 48), width=16, top_convs=1, skip="add", dropout=0.5,
                    eval_stride=(9, 9, 2), lr_step=2000, eval_tta=True, out="runs/LA_half"),
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
}  # LA, LA_half: the official V-Net's top level and dropout on the U-Net (docs/choices.md).
# LA_half: LA at half resolution, sized for a CPU: lr x0.1 for the last 400. ACDC: constant lr
# (official); ACDC_cpu: x0.1 for the last 600. LA_half and ACDC_cpu scored with mirror TTA
# (deviations, chosen on validation). Pancreas: official uses V-Net + Adam 1e-3 (deviation)
RUNTIME = {"root", "out", "device", "amp", "log_every", "ckpt_every", "eval_split",
           "eval_stride", "eval_lcc", "eval_model", "eval_tta"}  # what --resume, --eval may change

def make_config(preset="sample", **overrides):
    """The preset's config; then what the data folder's bcp_dataset.json says; then overrides."""
    root = overrides.get("root", PRESETS[preset].get("root", Config.root))
    fields = {f.name for f in dataclasses.fields(Config)}
    folder = {k: v for k, v in gd.dataset_defaults(root)[1].items() if k in fields}
    merged = {**PRESETS[preset], **folder, **overrides, "data": preset}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})

CLASS_NAMES = {2: ["LA"], 4: ["RV", "Myo", "LV"]}  # foreground classes: LA; ACDC

def class_names(cfg):
    return list(cfg.class_names or CLASS_NAMES.get(cfg.num_classes) or map(str, range(
        1, cfg.num_classes)))

def config_from_checkpoint(state, given):
    """--resume and --eval: the run's config, flags given now on top (only RUNTIME ones)."""
    older = {"rotate": 0, "eval_tta": False, "top_convs": 2, "skip": "concat", "direction":
             "both", "pretrain_mix": True, "mask_shape": "box"}  # fields added
    fields = {f.name for f in dataclasses.fields(Config)}  # (and drops fields since removed)
    saved = {k: v for k, v in {**older, **state["cfg"]}.items() if k in fields}
    fixed = sorted(k for k, v in given.items() if k not in RUNTIME and v != saved.get(k))
    if fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')}: fixed by the checkpoint's run; only "
                        f"{', '.join(sorted(RUNTIME))} may change. Start a new --out instead")
    return make_config(saved["data"], **{**saved, **given, "data": saved["data"]})

def check_config(cfg):
    """Refuse impossible values before any work starts, naming the flag."""
    step = 4 if cfg.method == "bcp" else 2
    bad = [msg for ok, msg in [
        (len(cfg.patch) in (2, 3) and all(p > 0 and p % 16 == 0 for p in cfg.patch),
         f"--patch {' '.join(map(str, cfg.patch))}: each side must be a positive multiple of "
         "16 (the U-Net halves it 4 times), e.g. --patch 64 64 48"),
        (cfg.batch_size >= step and cfg.batch_size % step == 0, f"--batch-size "
         f"{cfg.batch_size}: must be a positive multiple of {step} (half labeled, half "
         "unlabeled, each half split into the a and b of a mix)"),
        (len(cfg.eval_stride) == 3 or len(cfg.patch) == 2, "--eval-stride: X Y Z"),
        (0 < cfg.beta < 1 and cfg.alpha >= 0 and 0 <= cfg.ema_decay <= 1 and 0 <= cfg.dropout < 1
         and cfg.lr > 0 and min(cfg.labeled, cfg.width, cfg.lr_step, *cfg.eval_stride) >= 1 and
         min(cfg.pretrain_iters, cfg.selftrain_iters) >= 0, "--beta in (0, 1), --alpha >= 0, "
         "--ema-decay in [0, 1], --dropout in [0, 1); --lr, --labeled, --width, --lr-step, "
         "--eval-stride > 0; iterations >= 0"),
        (min(cfg.log_every, cfg.ckpt_every) >= 1 and cfg.ckpt_every % cfg.log_every == 0,
         f"--ckpt-every {cfg.ckpt_every}: a multiple of --log-every {cfg.log_every}"),
        (len(cfg.class_names) in (0, cfg.num_classes - 1), f"--class-names: one name per "
         f"foreground class, {cfg.num_classes - 1} for --num-classes {cfg.num_classes}"),
        (len(cfg.window) == 2 and cfg.window[0] < cfg.window[1], "--window LOW HIGH, LOW < HIGH"),
        (0 <= cfg.rotate <= 180, f"--rotate {cfg.rotate}: degrees in [0, 180]"),
        *[(getattr(cfg, f.name) in f.metadata["choices"], f"--{f.name.replace('_', '-')} "
           f"{getattr(cfg, f.name)}: one of {f.metadata['choices']}")
          for f in dataclasses.fields(cfg) if f.metadata["choices"]],
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
    capability >= 8.0, else fp16 (a T4 emulates bf16). CPU, "auto": bf16 with AMX (1.5x a
    step, docs/choices.md), else fp32 (AMD AVX512-BF16: 1.7x, but non-finite losses on Zen 5)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if mode == "auto" and device.type == "cpu":
        mode = "on" if amx else "off"
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
    """The U-Net a config describes (2-D or 3-D from the patch)."""
    dims = len(cfg.patch)
    return UNet(1, cfg.num_classes, cfg.width, dims, cfg.dropout, cfg.top_convs, cfg.skip).to(
        device, memory_format=gd.MEMORY_FORMAT[dims])

def teacher_of(student):
    """theta_t <- theta_s: a frozen copy of the student."""
    return copy.deepcopy(student).requires_grad_(False)

def make_run(cfg):
    """The data, model and random stream of cfg (train and benchmark.py use it)."""
    check_config(cfg)
    (rank, world), device = dist_setup(cfg), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    g = torch.Generator().manual_seed(cfg.seed + rank)  # its own crops and masks per process
    images, labels, unlabeled = gd.load_training(cfg.root, cfg.labeled, cfg.num_classes,
                                                 cfg.patch, need_unlabeled=cfg.method == "bcp")
    autocast, scaler = amp_setup(cfg.amp, device)
    sampler = lambda ims, lbs: gd.VolumeSampler(ims, lbs, cfg.patch, device, g,  # noqa: E731
                                             rotate=cfg.rotate)
    return Run(cfg, make_model(cfg, device), sampler(images, labels), sampler(unlabeled, None),
               g, None, None, scaler, autocast, rank, world)

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
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    if lead:  # what --amp auto chose
        print(f"{cfg.method} on {device}{threads}, {PRECISION[amp_dtype(cfg.amp, device)]} "
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
            with open(out / "log.csv") as f:
                rows = [r for r in csv.DictReader(f) if (names.index(r["stage"]), int(r["iter"]))
                        <= (names.index(done[0]), done[1])]
    if lead:
        with open(out / "log.csv.tmp", "w", newline="") as f:  # atomic, as the checkpoints
            csv.DictWriter(f, LOG_FIELDS).writerows([dict(zip(LOG_FIELDS, LOG_FIELDS))] + rows)
        os.replace(out / "log.csv.tmp", out / "log.csv")
    log = open(out / "log.csv" if lead else os.devnull, "a", newline="")
    ckpt, save = out / "ckpt_last.pt", lambda path, st: lead and gd.save_checkpoint(path, st)
    for stage, iters in stages[names.index(done[0]):]:
        resumed = state is not None and stage == done[0]
        if stage == "selftrain" and cfg.method == "bcp":
            run.teacher = teacher_of(run.model)  # theta_t <- theta_s
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
    state = gd.load_checkpoint(Path(out) / "ckpt_last.pt", "--resume: start without --resume")
    return config_from_checkpoint(state, {**(given or {}), "out": str(out)}), state

# 7. Evaluation: sliding windows over whole volumes, and the paper's four metrics ------------

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
    images of its input in x and y if `mirror` (nnU-Net's test-time augmentation, TTA). Returns
    log(mean p), which every caller takes as it takes a model's logits."""

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
    """-> (the model --eval / --predict use, its name): cfg.eval_model's weights of `state`
    (the student where it has no teacher: pre-training, sup), mirrored if cfg.eval_tta."""
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
    return torch.stack([gd.resize(model(gd.resize(sl.to(dev), cfg.patch)[None, None]).argmax(1)[0],
                               sl.shape).long() for sl in image])  # (slices, H, W)

def evaluate(model, cfg, split=None, progress=True):
    """Score `model` on `<split>.list` (default cfg.eval_split) -> metrics (as metrics.json). Per
    case and foreground class: the prediction (predict_volume), its largest component
    (official LA post-processing, cfg.eval_lcc), then Dice, Jaccard, 95HD, ASD in voxels.
    Several classes (ACDC): the top-level numbers are the means over the classes."""
    from tqdm.auto import tqdm
    cases, images, labels = gd.load_split(cfg.root, split or cfg.eval_split, cfg.num_classes)
    model.eval()
    names, keys, rows = class_names(cfg), ("dice", "jaccard", "hd95", "asd"), []
    for case, image, gt in tqdm(list(zip(cases, images, labels)), "eval", disable=not progress):
        pred = predict_volume(model, torch.from_numpy(image), cfg)[None]  # (1, *S)
        pred = (largest_per_class(pred, cfg.num_classes) if cfg.eval_lcc else pred)[0].cpu()
        per = {}
        for k, name in enumerate(names, 1):
            p = (pred == k).numpy()
            h95, mean_sd = surface_metrics(p, gt == k)
            per[name] = dict(dice=dice(p, gt == k), jaccard=jaccard(p, gt == k), hd95=h95,
                             asd=mean_sd)
        rows.append({"case": case, **{m: float(np.mean([c[m] for c in per.values()]))
                                      for m in keys}, **({"classes": per} if len(per) > 1 else {})})
    metrics = {m: float(np.mean([r[m] for r in rows])) for m in keys}
    if len(names) > 1:
        metrics["classes"] = {c: {m: float(np.mean([r["classes"][c][m] for r in rows]))
                                  for m in keys} for c in names}
    return {**metrics, "cases": rows}

# 8. Segmenting new scans: NIfTI or h5 in, NIfTI masks and volumes in mL out ----------------

def predict(model, cfg, source, out, rank=0, world=1, progress=True):
    """Segment every .nii/.nii.gz/.h5 scan in `source` (a file or a folder) into
    out/<name>.nii.gz (the input's shape, affine and header; h5: identity affine) and
    out/volumes.csv. Reading and writing are the data side's (gd.read_scan: a NIfTI scan
    normalised and resampled as the run's cases were); the prediction is --eval's (padded where
    smaller than the patch; 2-D models slice by slice along the slice axis) with its largest
    component. A bad scan is named in one line and skipped; a scan whose mask exists is
    skipped. Ranks share the scans. -> the names of the scans that failed."""
    from tqdm.auto import tqdm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    failed, rows, names = [], [], class_names(cfg)
    for path, name in tqdm(gd.find_scans(source)[rank::world], "predict", disable=not progress):
        if (out / f"{name}.nii.gz").is_file():
            continue
        try:
            image, affine, header, voxel, shape = gd.read_scan(path, cfg.norm, cfg.window,
                                                               cfg.spacing)
            # 2-D models: NIfTI is (H, W, slices), h5 (ACDC) already (slices, H, W) as --eval
            to_slices = len(cfg.patch) == 2 and header is not None
            x = torch.from_numpy(image.transpose(2, 0, 1) if to_slices else image)
            lab = predict_volume(model, x, cfg, shape if len(cfg.patch) == 3 else None)[None]
            lab = largest_per_class(lab, cfg.num_classes) if cfg.eval_lcc else lab
            lab = lab[0].cpu().numpy().astype(np.uint8)
            lab = lab.transpose(1, 2, 0) if to_slices else lab  # back to (H, W, slices)
        except Exception as e:
            print(f"error: {path}: {e}; skipped", file=sys.stderr)
            failed.append(path.name)
            continue
        gd.write_mask(out / f"{name}.nii.gz", lab, affine, header)
        for k, cname in enumerate(names, 1):
            n = int((lab == k).sum())
            rows.append([name, cname, n, "" if voxel is None else round(n * voxel / 1000, 3)])
    if world > 1:  # the first process writes every process's rows
        every = [None] * world
        torch.distributed.all_gather_object(every, (rows, failed))
        rows, failed = [r for e in every for r in e[0]], [f for e in every for f in e[1]]
    if rank == 0:
        gd.add_volumes(out / "volumes.csv", rows)
    return failed

# 9. Command line: every Config field is a flag, --data picks the preset of the defaults -----

def _bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")

def cli(argv):
    """Train (then score the final model), --resume, --eval or --predict -> exit status. --data
    is read first: it sets the defaults --help shows; a folder made by get_data.py names its
    preset, so --root OUT alone picks it."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--data", choices=list(PRESETS))
    first.add_argument("--root")
    known = first.parse_known_args(argv)[0]
    data = known.data or (known.root and gd.dataset_defaults(known.root)[0]) or "sample"
    base = make_config(data, **({"root": known.root} if known.root else {}))
    p = argparse.ArgumentParser(description="Bidirectional Copy-Paste (BCP, CVPR 2023): semi-"
                                "supervised segmentation of 3-D (LA, CT) and 2-D (ACDC) images."
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
    cfg, state, extra = make_config(data, **given), None, {}
    if args.eval or args.predict:  # writes beside the checkpoint, never over the run's own
        if args.predict and not args.ckpt:
            raise UserError("--predict needs --ckpt CKPT (a checkpoint of a training run)")
        ckpt, kind = args.eval or args.ckpt, "predict" if args.predict else "eval"
        state = gd.load_checkpoint(ckpt)
        cfg = config_from_checkpoint(state, {
            "out": str(Path(ckpt).parent / f"{kind}_{Path(ckpt).stem}"), **given})
    else:
        if args.resume:
            cfg, state = resume_run(cfg.out, given)
        check_config(cfg)  # the flags first, then the data (the eval list: now, not later)
        if not (args.resume or cfg.data == "sample" or "root" in given or Path(cfg.root).is_dir()):
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # not N downloads into one folder
                raise UserError(f"{cfg.root} is missing; under torchrun fetch it first, once: "
                                f"`python get_data.py {cfg.data} --root {cfg.root}`")
            gd.prepare(cfg.data, cfg.root)  # the preset's default folder is missing: fetch it
        if cfg.eval_split != "none":
            gd.read_list(cfg.root, cfg.eval_split, cfg.num_classes)
        t0 = time.time()
        if train(cfg, state).rank:
            return 0  # under torchrun the first process evaluates
        extra = {"train_seconds": round(time.time() - t0, 1)}
        state = gd.load_checkpoint(Path(cfg.out) / "final.pt")  # scored as --eval scores it
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
    m = {**evaluate(model, cfg), **extra, "scored": use}  # + time, which weights
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(m, indent=2))
    print(f"{cfg.method} ({use}) on {cfg.root}, {len(m['cases'])} {cfg.eval_split} cases: Dice "
          f"{m['dice']:.4f}  Jaccard {m['jaccard']:.4f}  95HD {m['hd95']:.2f}  ASD "
          f"{m['asd']:.2f}  -> {Path(cfg.out) / 'metrics.json'}")
    return 0

def main(argv=None):
    try:
        return cli(argv)
    except UserError as e:  # bad input: one line naming the file or flag and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
