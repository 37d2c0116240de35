"""ACDC: 2-D slices, four classes, the SSL4MIS layout (nested and flat), per-class metrics."""
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from make_samples import make_acdc_samples

import bcp_minimal as bm
import get_data as gd


def make_acdc(root, flat=False, patients=5, slices=3, shape=(40, 36)):
    return make_acdc_samples(root, flat, patients, slices, shape)


FAST = dict(pretrain_iters=2, selftrain_iters=2, patch=(32, 32), batch_size=8, width=2,
            log_every=1, ckpt_every=1, device="cpu")


@pytest.mark.parametrize("flat", [False, True])
def test_acdc_trains_and_scores_per_class_in_both_layouts(tmp_path, flat):
    root = make_acdc(tmp_path / "acdc", flat=flat)
    cfg = bm.make_config("ACDC", root=str(root), out=str(tmp_path / "run"), labeled=1,
                         eval_split="val", **FAST)
    run = bm.train(cfg, progress=False)
    assert len(run.lab.images) == 6 and len(run.unl.images) == 12  # patient 1: 2 frames x 3 slices
    assert run.lab.images[0].shape == (32, 32)  # each slice resized to the patch
    assert run.lab.rotate == run.unl.rotate == cfg.rotate == 20  # official ACDC augmentation
    m = bm.evaluate(run.model, cfg, progress=False)
    assert set(m["classes"]) == {"RV", "Myo", "LV"} and len(m["cases"]) == 2
    for k in ("dice", "jaccard", "hd95", "asd"):  # top level = mean over the three classes
        assert m[k] == pytest.approx(np.mean([m["classes"][c][k] for c in ("RV", "Myo", "LV")]))


class Oracle(torch.nn.Module):
    """Reads the class off the image (image = label / 3 + noise), but calls LV myocardium."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = (x[:, 0] * 3).round().clamp(0, 3).long()
        k[k == 3] = 2
        return F.one_hot(k, 4).movedim(-1, 1).float()


def test_slice_wise_prediction_and_per_class_metrics_against_medpy(tmp_path):
    medpy = pytest.importorskip("medpy.metric.binary")
    root = make_acdc(tmp_path / "acdc")
    cfg = bm.make_config("ACDC", root=str(root), patch=(32, 32), eval_split="test")
    _, images, labels = gd.load_split(root, "test", 4)
    pred = bm.predict_volume(Oracle(), torch.from_numpy(images[0]), cfg).numpy()
    assert pred.shape == labels[0].shape  # resized to the patch and back, slice by slice
    m = bm.evaluate(Oracle(), cfg, progress=False)
    case = m["cases"][0]["classes"]
    for k, name in ((1, "RV"), (2, "Myo")):
        assert case[name]["dice"] == pytest.approx(medpy.dc(pred == k, labels[0] == k))
        assert case[name]["hd95"] == pytest.approx(medpy.hd95(pred == k, labels[0] == k))
    assert case["LV"]["dice"] == 0.0  # an empty class is a failure: Dice 0, worst distance
    assert case["LV"]["hd95"] == pytest.approx(np.sqrt(sum((s - 1) ** 2 for s in pred.shape)))


def test_mask_and_mix_in_2d_by_hand():
    M = bm.bcp_mask((6, 9), beta=2 / 3, center=True)  # a box of int(6 * 2/3) x int(9 * 2/3) = 4 x 6
    expected = torch.ones(6, 9)
    expected[1:5, 1:7] = 0  # centred: starts (6 - 4) // 2 = 1 and (9 - 6) // 2 = 1
    assert torch.equal(M, expected)
    a, b = torch.zeros(1, 1, 6, 9), torch.ones(1, 1, 6, 9)
    assert torch.equal(bm.mix(a, b, M)[0, 0], 1 - M)  # b only inside the box
    ya, yb = torch.full((1, 6, 9), 3), torch.full((1, 6, 9), 1)
    assert torch.equal(bm.mix(ya, yb, M)[0], torch.where(M.bool(), 3, 1))


@pytest.mark.skipif(not (SHARED_DATA / "ACDC").is_dir(), reason="real ACDC (../shared/data) not present")
def test_labeled_patients_to_slices_as_bcp():
    slices = (SHARED_DATA / "ACDC" / "train_slices.list").read_text().split()
    assert gd.patients_to_slices(slices, 3) == 68 and gd.patients_to_slices(slices, 7) == 136
    assert gd.patients_to_slices(slices, 70) == 1312


def _run(capsys, *argv):
    code = bm.main([str(a) for a in argv])
    return code, capsys.readouterr().err


ARGS = ["--data", "ACDC", "--labeled", "1", "--pretrain-iters", "1", "--selftrain-iters", "1",
        "--patch", "32", "32", "--batch-size", "8", "--width", "2", "--device", "cpu"]


def test_missing_slices_folder_is_one_clear_line(capsys, tmp_path):
    root = make_acdc(tmp_path / "acdc")
    shutil.rmtree(root / "data" / "slices")
    code, err = _run(capsys, "--root", root, "--out", tmp_path / "o", *ARGS)
    assert code == 2 and "data/slices" in err and "_slice_" in err and err.count("\n") == 1


def test_label_value_4_is_refused(capsys, tmp_path):
    root = make_acdc(tmp_path / "acdc")
    name = (root / "train_slices.list").read_text().split()[2]
    path = root / "data" / "slices" / f"{name}.h5"
    with h5py.File(path, "a") as f:
        f["label"][0, 0] = 4
    code, err = _run(capsys, "--root", root, "--out", tmp_path / "o", *ARGS)
    assert code == 2 and str(path) in err and "4 classes allow 0..3" in err


def test_slice_and_label_of_different_shapes(capsys, tmp_path):
    root = make_acdc(tmp_path / "acdc")
    name = (root / "train_slices.list").read_text().split()[0]
    path = root / "data" / "slices" / f"{name}.h5"
    with h5py.File(path, "a") as f:
        lb = f["label"][()]
        del f["label"]
        f["label"] = lb[:-1]
    code, err = _run(capsys, "--root", root, "--out", tmp_path / "o", *ARGS)
    assert code == 2 and str(path) in err and "shape" in err


class Bright(torch.nn.Module):
    """A fake 2-D model that only takes the training patch: class 1 where the pixel is > 0.5."""

    def __init__(self, patch):
        super().__init__()
        self.patch, self.w = tuple(patch), torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.patch, f"got {tuple(x.shape[2:])}, the model takes {self.patch}"
        fg = (x[:, 0] > 0.5).float()
        return torch.stack([1 - fg, fg], 1) * 5


def test_2d_prediction_resizes_each_slice_to_the_patch_and_back():
    """Slices of 40 x 24 go through a model that takes only 32 x 32, and come back 40 x 24, with
    the bright square where it was (nearest neighbour both ways: the square's inner part exact)."""
    cfg = bm.make_config("ACDC", patch=(32, 32), num_classes=2)
    image = torch.zeros(3, 40, 24)
    image[1, 10:30, 6:18] = 1  # slice 1: a 20 x 12 square
    pred = bm.predict_volume(Bright((32, 32)), image, cfg)
    assert pred.shape == (3, 40, 24) and not pred[0].any() and not pred[2].any()
    assert pred[1, 11:29, 7:17].all() and not pred[1, :8].any() and not pred[1, :, 20:].any()


def test_2d_predict_reads_h_w_slices_and_writes_the_same_orientation(tmp_path):
    """--predict on a 2-D model: a NIfTI (H, W, slices) is predicted slice by slice along the
    last axis and its mask written back (H, W, slices), the square where it was."""
    nib = pytest.importorskip("nibabel")
    scan = np.zeros((40, 24, 5), np.float32)
    scan[10:30, 6:18, 3] = 1  # a square in slice 3 only, already in [0, 1]
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(scan, np.diag([1.5, 1.5, 8, 1])), str(tmp_path / "in" / "heart.nii.gz"))
    cfg = bm.make_config("ACDC", patch=(32, 32), num_classes=2, eval_lcc=True)
    assert bm.predict(Bright((32, 32)), cfg, tmp_path / "in", tmp_path / "out", progress=False) == []
    mask = np.asarray(nib.load(str(tmp_path / "out" / "heart.nii.gz")).dataobj)
    assert mask.shape == (40, 24, 5) and mask[..., [0, 1, 2, 4]].sum() == 0
    assert mask[11:29, 7:17, 3].all() and mask[..., 3].sum() <= 20 * 12 + 2 * (20 + 12)


def test_predict_on_an_acdc_h5_volume_slices_it_as_eval_does(tmp_path):
    """--predict on ACDC's own h5 volume (slices, H, W), stored as --eval reads it: the same
    mask as --eval's prediction, slice by slice along the first axis (not NIfTI's last)."""
    nib = pytest.importorskip("nibabel")
    root = make_acdc(tmp_path / "acdc")
    cfg = bm.make_config("ACDC", root=str(root), patch=(32, 32), eval_split="test")
    case = (root / "test.list").read_text().split()[0]
    image = gd.load_case(root, case, 4)[0]
    assert image.shape[0] != image.shape[2]  # (slices, H, W): an axis mix-up would show
    want = bm.predict_volume(Oracle(), torch.from_numpy(image), cfg).numpy()
    assert bm.predict(Oracle(), cfg, gd.case_path(root, case), tmp_path / "out", progress=False) == []
    got = np.asarray(nib.load(str(tmp_path / "out" / f"{case}.nii.gz")).dataobj)
    assert got.shape == image.shape and np.array_equal(got, want) and want.any()
