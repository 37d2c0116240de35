"""Figures for the notebooks (not the method: bcp_minimal.py never imports this file).

Every function returns a matplotlib Figure built without pyplot, so it changes no backend and
needs no display; a notebook shows it with `display(fig)` or as a cell's last value.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import bcp_minimal as bm

SOURCE = ListedColormap(["none", "limegreen", "orange"])  # 1 ground truth, 2 pseudo-label


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



def _z(M, y=None):
    """A z slice through the box of M and, if given, through the foreground of y."""
    zs = torch.nonzero(M == 0)[:, -1]
    if y is not None and (y > 0).any():
        fg = torch.nonzero(y > 0)[:, -1]
        inside = fg[(fg >= zs.min()) & (fg <= zs.max())]
        if len(inside):
            return int(inside.float().median())
    return int(zs.float().mean())


def show_mix(batch, i=0, title=""):
    """The mixed inputs of one training batch and where their labels come from.

    batch: the dict of bm.selftrain_batch (x_in, y_in, x_out, y_out, M) or bm.pretrain_batch
    (x, y, M). Ground-truth foreground is green, pseudo-labeled foreground orange, the box cyan.
    """
    M = batch["M"].cpu()
    pairs = ([("X_in (labeled outside the box)", "x_in", "y_in", M == 1),
              ("X_out (labeled inside the box)", "x_out", "y_out", M == 0)] if "x_in" in batch
             else [("x = x_a M + x_b (1 - M), both labeled", "x", "y", torch.ones_like(M) > 0)])
    z = _z(M, batch[pairs[0][2]][i].cpu())
    fig = Figure(figsize=(5.2 * len(pairs), 3.2))
    axes = fig.subplots(1, 2 * len(pairs))
    for k, (name, xk, yk, gt_region) in enumerate(pairs):
        x, y = batch[xk][i, 0, :, :, z].float().cpu(), batch[yk][i, :, :, z].cpu()
        src = np.where(y == 0, 0, np.where(gt_region[:, :, z], 1, 2))
        for j, ax in enumerate(axes[2 * k: 2 * k + 2]):
            ax.imshow(x.T, cmap="gray", origin="lower")
            if j:
                ax.imshow(src.T, cmap=SOURCE, vmin=0, vmax=2, alpha=0.6, origin="lower",
                          interpolation="nearest")
            ax.contour(M[:, :, z].T, levels=[0.5], colors="cyan", linewidths=1.2)
            ax.set_title(name if not j else "its label: green ground truth" + (
                ", orange pseudo-label" if len(pairs) > 1 else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle(title or f"z = {z}")
    fig.tight_layout()
    return fig


def loss_weight_maps(batch, alpha, num_classes=2):
    """Effective per-voxel weight that bm.bcp_loss gives each voxel of X_in and X_out: the size
    of the loss's gradient w.r.t. the logits (L1 over classes) at uniform logits, divided by
    its mean over the ground-truth region of X_in. -> (w_in, w_out), each (h, *P) tensors."""
    M, maps = batch["M"], []
    for outer, inner, w_o, w_i in [("y_a", "p_a", 1.0, alpha), ("p_b", "y_b", alpha, 1.0)]:
        y = batch[outer]
        q = torch.zeros(y.shape[0], num_classes, *y.shape[1:], device=y.device,
                        requires_grad=True)
        bm.bcp_loss(q, batch[outer], batch[inner], M, w_o, w_i).backward()
        maps.append(q.grad.abs().sum(1))  # (h, *P)
    ref = maps[0][:, M == 1].mean()
    return maps[0] / ref, maps[1] / ref


def show_weights(batch, alpha, num_classes=2):
    """Figure: the effective per-voxel loss weights of X_in and X_out (loss_weight_maps)."""
    w_in, w_out = (w[0].cpu() for w in loss_weight_maps(batch, alpha, num_classes))
    M = batch["M"].cpu()
    z = _z(M)
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    vmax = float(max(w_in.max(), w_out.max()))
    for ax, w, name, gt in [(axes[0], w_in, "X_in", M == 1), (axes[1], w_out, "X_out", M == 0)]:
        im = ax.imshow(w[:, :, z].T, cmap="viridis", vmin=0, vmax=vmax, origin="lower")
        ax.set_title(f"{name}: mean weight, ground truth {w[gt].mean():.2f}, "
                     f"pseudo-label {w[~gt].mean():.2f}", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="per-voxel weight (GT voxel of X_in = 1)")
    return fig


CLASSES = ListedColormap(["none", "tab:red", "tab:green", "tab:blue"])  # ACDC: RV, Myo, LV


def show_classes(batch, i=0, title=""):
    """2-D (ACDC) batches: each mixed input beside its label coloured by class (RV red, Myo
    green, LV blue), the box in cyan. batch: bm.selftrain_batch's or bm.pretrain_batch's dict."""
    M = batch["M"].cpu()
    keys = [("x_in", "y_in"), ("x_out", "y_out")] if "x_in" in batch else [("x", "y")]
    fig = Figure(figsize=(5.2 * len(keys), 3.2))
    axes = fig.subplots(1, 2 * len(keys))
    for k, (xk, yk) in enumerate(keys):
        x, y = batch[xk][i, 0].float().cpu(), batch[yk][i].cpu()
        for j, ax in enumerate(axes[2 * k: 2 * k + 2]):
            ax.imshow(x.T, cmap="gray", origin="lower")
            if j:
                ax.imshow(np.ma.masked_equal(y.numpy(), 0).T, cmap=CLASSES, vmin=0, vmax=3,
                          alpha=0.6, origin="lower", interpolation="nearest")
            ax.contour(M.T, levels=[0.5], colors="cyan", linewidths=1.2)
            ax.set_title(xk if not j else f"{yk}: RV red, Myo green, LV blue", fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# The distribution gap (paper Fig. 5): features of labeled vs unlabeled pixels ------------------

@torch.no_grad()
def pixel_features(model, images, labels, cls, n=500, seed=0):
    """Per-pixel features before the model's last 1x1 convolution (its head's input), of the
    pixels where prediction = ground truth = `cls`, n of them drawn at random: the official
    code/KDE_demo.py's choice. images, labels: lists of 2-D slices or 3-D volumes whose sides
    divide by 16 (resize or pad first). The ground truth only picks pixels, as in KDE_demo.
    -> (n, C) numpy (fewer where fewer pixels qualify)."""
    model.eval()
    device = next(model.parameters()).device
    kept, grab = [], {}
    hook = model.head.register_forward_hook(lambda m, i, o: grab.update(x=i[0]))
    try:
        for image, label in zip(images, labels):
            x = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
            pred = model(x).argmax(1)[0].cpu()
            feats = grab["x"][0].float().cpu()  # (C, *S)
            ok = (pred == cls) & (torch.as_tensor(np.asarray(label)) == cls)
            kept.append(feats[:, ok].T)  # (pixels, C)
    finally:
        hook.remove()
    f = torch.cat(kept) if kept else torch.zeros(0, 1)
    pick = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:n]
    return f[pick].numpy()


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to feature sets a (n, C) and b (m, C), on all
    channels: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (as FID). 0: the same
    mean and covariance."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def show_gap(feature_sets: dict, title=""):
    """Paper Fig. 5: for each model, kernel densities of the channel-mean feature of labeled
    (blue) and unlabeled (orange) pixels of one class, and the Fréchet distance of the two sets
    on all channels. feature_sets: {model name: (labeled (n, C), unlabeled (m, C))}."""
    from scipy.stats import gaussian_kde
    fig = Figure(figsize=(4.2 * len(feature_sets), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(feature_sets)))
    for ax, (name, (fl, fu)) in zip(axes, feature_sets.items()):
        ml, mu = fl.mean(1), fu.mean(1)
        grid = np.linspace(min(ml.min(), mu.min()), max(ml.max(), mu.max()), 200)
        for v, label, color in ((ml, "labeled", "tab:blue"), (mu, "unlabeled", "tab:orange")):
            ax.plot(grid, gaussian_kde(v)(grid), color=color, label=f"{label} ({len(v)} px)")
        ax.set_title(f"{name}: Fréchet distance {frechet_distance(fl, fu):.3f}", fontsize=9)
        ax.set_xlabel("feature before the last 1x1 conv, mean over channels", fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
