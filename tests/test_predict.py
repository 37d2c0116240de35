"""--predict: NIfTI (and h5) in, masks with the input's geometry and volumes in mL out."""
import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import bcp_minimal as bm
import get_data as gd

nib = pytest.importorskip("nibabel")


AFFINE = np.array([[0.0, -1.25, 0, 30], [1.25, 0, 0, -12], [0, 0, 2.5, 7], [0, 0, 0, 1]])


def _nifti(tiny_data, folder, case):
    with h5py.File(tiny_data / gd.CASES_DIR / case / gd.CASE_FILE) as f:
        image, label = f["image"][()], f["label"][()]
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{case}.nii.gz"))
    return label


def test_predict_nifti_keeps_geometry_and_matches_eval(capsys, tiny_data, trained, tmp_path):
    """--predict writes masks on the input's grid, and predicts as --eval does: an h5 case (read
    as stored) to the last digit of its Dice; the same case as NIfTI is z-scored anew (the
    phantoms are z-scored to ~1e-4 only, so its input moves by < 1e-3 and a voxel near 0.5 may
    flip: the Dice agrees to 0.01)."""
    cases = (tiny_data / "test.list").read_text().split()
    labels = {c: _nifti(tiny_data, tmp_path / "in", c) for c in cases}
    (tmp_path / "in_h5").mkdir()
    for c in cases:
        shutil.copy(tiny_data / gd.CASES_DIR / c / gd.CASE_FILE, tmp_path / "in_h5" / f"{c}.h5")
    for src, out in (("in", "p"), ("in_h5", "p_h5")):
        assert bm.main(["--predict", str(tmp_path / src), "--ckpt", str(trained), "--out", str(tmp_path / out)]) == 0
    assert bm.main(["--eval", str(trained), "--out", str(tmp_path / "e")]) == 0
    evaluated = {r["case"]: r for r in json.loads((tmp_path / "e" / "metrics.json").read_text())["cases"]}
    rows = list(csv.DictReader(open(tmp_path / "p" / "volumes.csv")))
    for case in cases:
        mask = nib.load(str(tmp_path / "p" / f"{case}.nii.gz"))
        pred = np.asarray(mask.dataobj)
        assert pred.shape == labels[case].shape and np.allclose(mask.affine, AFFINE)
        assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
        assert (pred == 1).any() and (labels[case] == 1).any()  # a Dice of two empty masks proves nothing
        assert bm.dice(pred == 1, labels[case] == 1) == pytest.approx(evaluated[case]["dice"], abs=0.01)
        pred_h5 = np.asarray(nib.load(str(tmp_path / "p_h5" / f"{case}.nii.gz")).dataobj)
        assert bm.dice(pred_h5 == 1, labels[case] == 1) == pytest.approx(evaluated[case]["dice"], abs=1e-12)
        row = next(r for r in rows if r["case"] == case)
        assert int(row["voxels"]) == int((pred == 1).sum())
        assert float(row["ml"]) == pytest.approx(int(row["voxels"]) * 1.25 * 1.25 * 2.5 / 1000, abs=1e-3)


def test_predict_bad_scans_are_named_and_the_rest_written(capsys, tiny_data, trained, tmp_path):
    good = (tiny_data / "test.list").read_text().split()[0]
    _nifti(tiny_data, tmp_path / "in", good)
    d = tmp_path / "in"
    (d / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    nib.save(nib.Nifti1Image(np.zeros((24, 24), np.float32), np.eye(4)), str(d / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 16, 2), np.float32), np.eye(4)), str(d / "fourd.nii.gz"))
    nan = np.random.default_rng(0).normal(size=(24, 24, 16)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(d / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 24, 16), np.float32), np.eye(4)), str(d / "small.nii.gz"))
    with h5py.File(d / "h5case.h5", "w") as f:
        f["image"] = np.random.default_rng(1).normal(size=(24, 24, 16)).astype(np.float32)
    out = tmp_path / "p"
    code = bm.main(["--predict", str(d), "--ckpt", str(trained), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    for bad, why in [("garbage", ""), ("flat", "2-D"), ("fourd", "4-D"), ("nan", "NaN")]:
        line = next(line for line in err.splitlines() if f"{bad}.nii.gz" in line)
        assert why in line and not (out / f"{bad}.nii.gz").exists()
    assert (out / f"{good}.nii.gz").exists() and (out / "h5case.nii.gz").exists()
    assert nib.load(str(out / "small.nii.gz")).shape == (8, 24, 16)  # smaller than the patch: padded
    assert np.allclose(nib.load(str(out / "h5case.nii.gz")).affine, np.eye(4))  # h5: identity
    h5row = next(r for r in csv.DictReader(open(out / "volumes.csv")) if r["case"] == "h5case")
    assert h5row["ml"] == ""  # no spacing known: no mL
    before = (out / f"{good}.nii.gz").stat().st_mtime_ns
    bm.main(["--predict", str(d), "--ckpt", str(trained), "--out", str(out)])  # again: skips what exists
    assert (out / f"{good}.nii.gz").stat().st_mtime_ns == before


def test_predict_needs_a_checkpoint(capsys, tmp_path):
    assert bm.main(["--predict", str(tmp_path)]) == 2
    assert "--predict needs --ckpt" in capsys.readouterr().err


def test_eval_model_picks_the_weights_scored_and_predicted(capsys, monkeypatch, tiny_data, trained, tmp_path):
    """--eval-model: the student ("model", official) by default, the EMA teacher on request, the
    student where a checkpoint has no teacher (pretrain.pt); metrics.json and stdout say which."""
    seen = []
    real_evaluate, real_predict = bm.evaluate, bm.predict
    monkeypatch.setattr(bm, "evaluate", lambda m, *a, **k: seen.append(m.state_dict()) or real_evaluate(m, *a, **k))
    monkeypatch.setattr(bm, "predict", lambda m, *a, **k: seen.append(m.state_dict()) or real_predict(m, *a, **k))
    state = gd.load_checkpoint(trained)
    assert any(not torch.equal(state["model"][k], state["teacher"][k]) for k in state["model"])

    def same(sd, ref):
        return all(torch.equal(sd[k].cpu(), ref[k]) for k in ref)

    for flags, key in [([], "model"), (["--eval-model", "teacher"], "teacher"),
                       (["--eval-model", "student"], "model")]:
        out = tmp_path / f"e{len(seen)}"
        assert bm.main(["--eval", str(trained), "--out", str(out), *flags]) == 0
        assert same(seen[-1], state[key])
        scored = json.loads((out / "metrics.json").read_text())["scored"]
        assert scored == {"model": "student", "teacher": "teacher"}[key]
        assert f"({scored})" in capsys.readouterr().out
    _nifti(tiny_data, tmp_path / "in", (tiny_data / "test.list").read_text().split()[0])
    assert bm.main(["--predict", str(tmp_path / "in"), "--ckpt", str(trained), "--out",
                    str(tmp_path / "p"), "--eval-model", "teacher"]) == 0
    assert same(seen[-1], state["teacher"])
    pre = gd.load_checkpoint(trained.parent / "pretrain.pt")
    assert pre["teacher"] is None
    assert bm.main(["--eval", str(trained.parent / "pretrain.pt"), "--out", str(tmp_path / "pre"),
                    "--eval-model", "teacher"]) == 0
    assert same(seen[-1], pre["model"])
    assert json.loads((tmp_path / "pre" / "metrics.json").read_text())["scored"] == "student"


def test_predict_takes_every_scan_eval_takes(tiny_data, trained, tmp_path):
    """A scan thinner than the training patch (as LA_half's 44 slices under its 48-slice patch)
    is padded and cropped back: its mask has the scan's shape and equals predict_volume's."""
    state = gd.load_checkpoint(trained)
    cfg = bm.make_config("sample", **{**state["cfg"], "data": "sample", "patch": (16, 16, 16)})
    model = bm.make_model(cfg)
    model.load_state_dict(state["model"])
    with h5py.File(tiny_data / gd.CASES_DIR / (tiny_data / "test.list").read_text().split()[0] / gd.CASE_FILE) as f:
        image = f["image"][()][:, :, 3:13]  # 24 x 24 x 10: 10 slices < the patch's 16
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "in" / "thin.nii.gz"))
    assert bm.predict(model, cfg, tmp_path / "in", tmp_path / "out", progress=False) == []
    pred = np.asarray(nib.load(str(tmp_path / "out" / "thin.nii.gz")).dataobj)
    x = gd.read_scan(tmp_path / "in" / "thin.nii.gz", cfg.norm, cfg.window, cfg.spacing)[0]  # normalised as predict reads it
    want = bm.largest_per_class(bm.predict_volume(model.eval(), torch.from_numpy(x), cfg)[None], 2)[0]
    assert want.any()
    assert pred.shape == image.shape and np.array_equal(pred, want.numpy())


@pytest.mark.parametrize("norm", gd.NORMS)
def test_read_scan_normalises_nifti_by_the_run_and_reads_h5_as_stored(tmp_path, norm):
    """A NIfTI scan is raw: normalised by the run's norm, each by its own formula (not merely
    'some' normalisation: a z-scored scan differs from a min-max one). An h5 scan is a prepared
    case: read as stored, whatever the norm."""
    rng = np.random.default_rng(0)
    raw = (rng.normal(size=(20, 16, 12)) * 300 + 40).astype(np.float32)  # CT-like: HU around 40
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "raw.nii.gz"))
    cfg = bm.make_config("sample", norm=norm, window=(-100.0, 300.0))
    image = gd.read_scan(tmp_path / "raw.nii.gz", cfg.norm, cfg.window, cfg.spacing)[0]
    x = raw.astype(np.float64)
    want = {"zscore": (x - x.mean()) / x.std(), "minmax": (x - x.min()) / (x.max() - x.min()),
            "ct": (np.clip(x, -100, 300) + 100) / 400, "none": x}[norm]
    np.testing.assert_allclose(image, want, rtol=1e-5, atol=1e-5)
    with h5py.File(tmp_path / "case.h5", "w") as f:
        f["image"] = raw
    assert np.array_equal(gd.read_scan(tmp_path / "case.h5", cfg.norm, cfg.window, cfg.spacing)[0], raw)


class Threshold(torch.nn.Module):
    """A fake 3-D model: foreground where the voxel is bright."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        fg = (x[:, 0] > 0.5).float()
        return torch.stack([1 - fg, fg], 1) * 5


@pytest.mark.parametrize("lcc", [True, False])
def test_evaluate_keeps_the_largest_component_only_when_asked(tmp_path, lcc):
    """The organ (labeled) and a small bright blob (not labeled) far from it: with eval_lcc the
    blob is dropped and Dice is 1; without, it counts as a false positive."""
    root = tmp_path / "data"
    image = np.zeros((32, 32, 16), np.float32)
    label = np.zeros((32, 32, 16), np.uint8)
    image[4:16, 4:16, 4:12] = label[4:16, 4:16, 4:12] = 1  # the organ: 12 x 12 x 8
    image[26:29, 26:29, 10:13] = 1  # a 27-voxel blob
    (root / gd.CASES_DIR / "case0").mkdir(parents=True)
    with h5py.File(root / gd.CASES_DIR / "case0" / gd.CASE_FILE, "w") as f:
        f["image"], f["label"] = image, label
    (root / "test.list").write_text("case0\n")
    cfg = bm.make_config("sample", root=str(root), patch=(16, 16, 16), eval_stride=(8, 8, 8), eval_lcc=lcc)
    m = bm.evaluate(Threshold(), cfg, progress=False)
    want = 1.0 if lcc else 2 * 1152 / (1152 + 27 + 1152)
    assert m["dice"] == pytest.approx(want)


def _net(seed, dims=2, classes=3):
    """A position-dependent tiny net (asymmetric kernels): its mirror images differ."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(1, classes, 3, padding=1)
    return torch.nn.Sequential(conv, torch.nn.Tanh(), (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(classes, classes, 1))


def test_mirror_tta_is_the_mean_softmax_over_the_four_flips_by_hand():
    net, x = _net(0), torch.randn(2, 1, 5, 7)
    with torch.no_grad():
        got = bm.Averaged([net], mirror=True)(x).softmax(1)
        hand = (net(x).softmax(1) + net(x.flip(2)).softmax(1).flip(2) + net(x.flip(3)).softmax(1).flip(3)
                + net(x.flip(2).flip(3)).softmax(1).flip(3).flip(2)) / 4
        assert not torch.allclose(net(x).softmax(1), hand, atol=1e-3)  # the flips change the answer
    assert torch.allclose(got, hand, atol=1e-6)


def test_mirror_tta_in_3d_flips_x_and_y_as_training_does_never_z():
    net, x, calls = _net(1, dims=3), torch.randn(1, 1, 4, 5, 6), []
    net.register_forward_hook(lambda *a: calls.append(1))
    tta = bm.Averaged([net], mirror=True)
    with torch.no_grad():
        p = tta(x)
        assert len(calls) == 4
        hand = sum(net(x.flip(f)).softmax(1).flip(f) for f in [(), (2,), (3,), (2, 3)]) / 4
        assert torch.allclose(p.softmax(1), hand, atol=1e-6)
        for d in (2, 3):  # mirroring the input in x or y mirrors the prediction
            assert torch.allclose(tta(x.flip(d)), p.flip(d), atol=1e-5)
        assert not torch.allclose(tta(x.flip(4)), p.flip(4), atol=1e-3)  # z: not averaged over


def test_ensemble_is_the_mean_softmax_of_student_and_teacher():
    a, b, x = _net(2), _net(3), torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        mean = (a(x).softmax(1) + b(x).softmax(1)) / 2
        out = bm.Averaged([a, b])(x)
    assert torch.allclose(out.softmax(1), mean, atol=1e-6)
    assert torch.equal(out.argmax(1), mean.argmax(1))


def test_eval_ensemble_and_tta_flags(capsys, monkeypatch, tiny_data, trained, tmp_path):
    """--eval-model ensemble scores student and teacher together, --eval-tta mirrors; metrics.json
    and stdout say which; a checkpoint without a teacher falls back to its student."""
    seen, real = [], bm.evaluate
    monkeypatch.setattr(bm, "evaluate", lambda m, *a, **k: seen.append(m) or real(m, *a, **k))
    state = gd.load_checkpoint(trained)
    for flags, scored in [(["--eval-model", "ensemble"], "student+teacher"),
                          (["--eval-tta", "true"], "student, mirrored"),
                          (["--eval-model", "ensemble", "--eval-tta", "true"], "student+teacher, mirrored")]:
        out = tmp_path / f"e{len(seen)}"
        assert bm.main(["--eval", str(trained), "--out", str(out), *flags]) == 0
        m = seen[-1]
        assert isinstance(m, bm.Averaged) and m.mirror == ("mirrored" in scored)
        keys = ["model", "teacher"] if "+" in scored else ["model"]
        assert len(m.models) == len(keys)
        for net, k in zip(m.models, keys):
            assert all(torch.equal(net.state_dict()[n].cpu(), state[k][n]) for n in state[k])
        assert json.loads((out / "metrics.json").read_text())["scored"] == scored
        assert f"({scored})" in capsys.readouterr().out
    assert bm.main(["--eval", str(trained.parent / "pretrain.pt"), "--out", str(tmp_path / "pre"),
                    "--eval-model", "ensemble"]) == 0
    assert json.loads((tmp_path / "pre" / "metrics.json").read_text())["scored"] == "student"


def test_predict_reads_a_4d_scan_with_one_channel_as_get_data_does(tiny_data, trained, tmp_path):
    """An (X, Y, Z, 1) NIfTI, which `get_data.py nifti` accepts, is read by --predict too: the
    same mask as the (X, Y, Z) scan."""
    state = gd.load_checkpoint(trained)
    cfg = bm.make_config("sample", **{**state["cfg"], "data": "sample"})
    model = bm.make_model(cfg)
    model.load_state_dict(state["model"])
    image = gd.load_case(tiny_data, (tiny_data / "test.list").read_text().split()[0])[0]
    for name, data in (("three", image), ("four", image[..., None])):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / name / "scan.nii.gz"))
        assert bm.predict(model, cfg, tmp_path / name, tmp_path / f"out_{name}", progress=False) == []
    masks = [np.asarray(nib.load(str(tmp_path / f"out_{n}" / "scan.nii.gz")).dataobj) for n in ("three", "four")]
    assert masks[0].shape == image.shape and np.array_equal(masks[0], masks[1])
