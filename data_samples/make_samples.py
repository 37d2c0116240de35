"""The synthetic phantoms in this folder: small 'left atrium' scans in the official LA layout.

    python data_samples/make_samples.py            # rewrite data_samples/ (seeded: same files)

16 train (the first 2 are labeled by default), 4 test and 4 validation cases of 48x48x32
voxels. bcp_minimal reads them with the same loader as the real data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CASES_DIR, CASE_FILE = "2018LA_Seg_Training Set", "mri_norm2.h5"  # as bcp_minimal


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
        return ((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2
                + (Z - p0[2] - t * d[2]) ** 2 <= radius**2)

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


def make_sample_data(root="data_samples", n_train=16, n_test=4, n_val=4, shape=(48, 48, 32),
                     seed=0) -> Path:
    """Write phantoms in the official LA layout: train.list, test.list, val.list (the
    validation cases come last, so train and test do not depend on n_val)."""
    import h5py

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"PHANTOM{i:03d}" for i in range(n_train + n_test + n_val)]
    for name in names:
        image, label = make_phantom(shape, rng)
        d = root / CASES_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        with h5py.File(d / CASE_FILE, "w") as f:
            f.create_dataset("image", data=image, compression="gzip", shuffle=True)
            f.create_dataset("label", data=label, compression="gzip", shuffle=True)
    splits = {"train": names[:n_train], "test": names[n_train:n_train + n_test],
              "val": names[n_train + n_test:]}
    for split, cases in splits.items():
        if cases:
            (root / f"{split}.list").write_text("\n".join(cases) + "\n")
    return root


def make_heart_slice(rng, shape):
    """A 2-D 'cardiac' slice: LV (3) inside Myo (2) and an RV (1) beside it; image ~ label/3 +
    noise, in [0, 1] roughly as the SSL4MIS ACDC slices."""
    X, Y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    c = np.array(shape) / 2 + rng.uniform(-3, 3, 2)
    r = np.hypot(X - c[0], Y - c[1])
    lab = np.zeros(shape, np.uint8)
    lab[r < 9] = 2
    lab[r < 6] = 3
    lab[np.hypot(X - c[0] - 12, Y - c[1]) < 5] = 1
    return (lab / 3 + rng.normal(0, 0.05, shape)).astype(np.float32), lab


def make_acdc_samples(root, flat=False, patients=5, slices=3, shape=(40, 36), seed=0) -> Path:
    """A small synthetic ACDC in the SSL4MIS layout: per patient two frames (volumes of `slices`
    slices) in data/, their slices in data/slices/ (flat=True: all in data/); the first
    patients - 2 train (train_slices.list), then 2 volumes val.list, 2 test.list."""
    import h5py

    root, rng = Path(root), np.random.default_rng(seed)
    data = root / "data"
    (data if flat else data / "slices").mkdir(parents=True, exist_ok=True)
    train, vols = [], []
    for p in range(1, patients + 1):
        for frame in (1, 2):
            vol = f"patient{p:03d}_frame0{frame}"
            ims, lbs = zip(*[make_heart_slice(rng, shape) for _ in range(slices)])
            with h5py.File(data / f"{vol}.h5", "w") as f:
                f["image"], f["label"] = np.stack(ims), np.stack(lbs)
            for k in range(slices):
                name = f"{vol}_slice_{k}"
                with h5py.File((data if flat else data / "slices") / f"{name}.h5", "w") as f:
                    f["image"], f["label"] = ims[k], lbs[k]
                if p <= patients - 2:
                    train.append(name)
            vols.append(vol)
    (root / "train_slices.list").write_text("\n".join(train) + "\n")
    (root / "train.list").write_text("\n".join(vols[:-4]) + "\n")
    (root / "val.list").write_text("\n".join(vols[-4:-2]) + "\n")
    (root / "test.list").write_text("\n".join(vols[-2:]) + "\n")
    return root


if __name__ == "__main__":
    print(f"wrote {make_sample_data(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)}")
