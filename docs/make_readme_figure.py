"""Draws docs/bcp.png for the README: the mask, the two mixed inputs and where their labels come from.

    python bcp_minimal.py --out runs/sample     # a trained teacher
    python docs/make_readme_figure.py runs/sample/final.pt
"""
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bcp_minimal as bm
import get_data as gd  # noqa: E402

state = gd.load_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "runs/sample/final.pt")
teacher = bm.UNet(1, 2, state["cfg"]["width"])
teacher.load_state_dict(state["teacher"] or state["model"])
teacher.eval()
cases, images, labels = gd.load_split("data_samples", "train")
vol = lambda i: torch.from_numpy(images[i])[None, None]  # noqa: E731
z = int(np.nonzero(labels[0])[2].mean())
with torch.no_grad():  # the unlabeled case whose pseudo-label shows most at this slice
    pseudo = {i: bm.pseudo_label(teacher(vol(i))) for i in range(2, len(cases))}
u = max(pseudo, key=lambda i: int(pseudo[i][0, :, :, z].sum()))
# one labeled and one unlabeled scan, mixed in both directions (training uses two of each)
x_a = x_b = vol(0)
u_a = u_b = vol(u)
y_a = y_b = torch.from_numpy(labels[0])[None].long()
p_a = p_b = pseudo[u]


def both_sources(seed):  # pick a mask whose box edge cuts through the organs, for a readable picture
    M = bm.bcp_mask(images[0].shape, generator=torch.Generator().manual_seed(seed))
    y_in, y_out = bm.mix(y_a, p_a, M)[0, :, :, z], bm.mix(p_b, y_b, M)[0, :, :, z]
    Mz = M[:, :, z].bool()
    return min(((y_in > 0) & Mz).sum(), ((y_in > 0) & ~Mz).sum(), ((y_out > 0) & Mz).sum(), ((y_out > 0) & ~Mz).sum())


M = bm.bcp_mask(images[0].shape, generator=torch.Generator().manual_seed(max(range(100), key=both_sources)))
x_in, y_in, x_out, y_out = bm.mix(x_a, u_a, M), bm.mix(y_a, p_a, M), bm.mix(u_b, x_b, M), bm.mix(p_b, y_b, M)
Mz = M[:, :, z].numpy()
cmap = ListedColormap(["none", "limegreen", "orange"])
fig = Figure(figsize=(13, 3.4))
axes = fig.subplots(1, 5)
panels = [("mask M (box = 0)", None, None), ("labeled $X^l$", x_a, None), ("unlabeled $X^u$", u_a, None),
          ("$X^{in}$: unlabeled box in labeled", x_in, np.where(y_in[0, :, :, z] == 0, 0, np.where(Mz == 1, 1, 2))),
          ("$X^{out}$: labeled box in unlabeled", x_out, np.where(y_out[0, :, :, z] == 0, 0, np.where(Mz == 0, 1, 2)))]
for ax, (title, x, src) in zip(axes, panels):
    if x is None:
        ax.imshow(Mz.T, cmap="gray", vmin=0, vmax=1, origin="lower")
    else:
        ax.imshow(x[0, 0, :, :, z].T, cmap="gray", origin="lower")
    if src is not None:
        ax.imshow(src.T, cmap=cmap, vmin=0, vmax=2, alpha=0.55, origin="lower", interpolation="nearest")
        ax.contour(Mz.T, levels=[0.5], colors="cyan", linewidths=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("green: ground-truth label (loss weight 1)   orange: teacher pseudo-label (weight alpha = 0.5)",
             fontsize=10)
fig.tight_layout()
fig.savefig(Path(__file__).with_name("bcp.png"), dpi=90)
print("wrote docs/bcp.png")
