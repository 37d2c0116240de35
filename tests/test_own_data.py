"""Users' own scans: an MSD / nnU-Net NIfTI folder (some scans without any label) and the NIH
Pancreas-CT, through get_data.py, training, evaluation and --predict, on synthetic phantoms."""
import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from make_samples import make_phantom

import bcp_minimal as bm
import get_data as gd

nib = pytest.importorskip("nibabel")

TINY = ["--pretrain-iters", "6", "--selftrain-iters", "6", "--patch", "16", "16", "16", "--width", "4",
        "--batch-size", "8", "--eval-stride", "8", "8", "8", "--device", "cpu", "--log-every", "2",
        "--ckpt-every", "2"]
MR_AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def phantoms(n, seed, shape=(24, 24, 16)):
    rng = np.random.default_rng(seed)
    return [make_phantom(shape, rng) for _ in range(n)]


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """An nnU-Net v2 folder: 4 labeled scans, 2 truly unlabeled (no label file), 2 test scans,
    raw MR-like intensities (not z-scored), plus what real folders hold: a macOS '._' copy and
    a second channel (_0001), both to be ignored."""
    src = tmp_path_factory.mktemp("msd")
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (src / d).mkdir()
    cases = phantoms(8, 3)
    for i, (image, label) in enumerate(cases):
        raw = (image * 80 + 400).astype(np.float32)  # raw MR: mean 400, sd 80
        folder, name = ("imagesTs", f"test_{i}") if i >= 6 else ("imagesTr", f"case_{i}")
        nib.save(nib.Nifti1Image(raw, MR_AFFINE), str(src / folder / f"{name}_0000.nii.gz"))
        if i < 4:
            nib.save(nib.Nifti1Image(label, MR_AFFINE), str(src / "labelsTr" / f"{name}.nii.gz"))
    (src / "imagesTr" / "._case_0_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 16), np.float32), MR_AFFINE),
             str(src / "imagesTr" / "case_0_0001.nii.gz"))
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "atrium": 1},
        "numTraining": 6, "file_ending": ".nii.gz"}))
    return src, cases


@pytest.fixture(scope="module")
def msd_run(msd, tmp_path_factory):
    """get_data.py nifti --val 1, then `bcp_minimal.py --root OUT` with only the tiny budget."""
    src, _ = msd
    out = tmp_path_factory.mktemp("msd_out")
    assert gd.main(["nifti", "--src", str(src), "--root", str(out / "data"), "--val", "1"]) == 0
    assert bm.main(["--root", str(out / "data"), "--out", str(out / "run"), *TINY]) == 0
    return out


def test_nifti_folder_becomes_the_layout_the_module_trains_on(msd, msd_run):
    src, cases = msd
    root = msd_run / "data"
    train, val = (root / "train.list").read_text().split(), (root / "val.list").read_text().split()
    assert train == ["case_0", "case_1", "case_2", "case_4", "case_5"]  # 3 labeled, then unlabeled
    assert val == ["case_3"]  # the last labeled case held out
    meta = json.loads((root / gd.DATASET_FILE).read_text())
    assert meta["preset"] == "LA_half"
    assert meta["config"] | {} == {**meta["config"], "num_classes": 2, "class_names": ["atrium"],
                                   "norm": "zscore", "labeled": 3, "eval_split": "val"}
    for i, case in enumerate(["case_0", "case_4"]):  # labeled, unlabeled
        with h5py.File(root / gd.CASES_DIR / case / gd.CASE_FILE) as f:
            assert ("label" in f) == (i == 0)  # the unlabeled case holds no label at all
            image = f["image"][()]
            np.testing.assert_allclose(f.attrs["spacing"], [1.5, 1.5, 3.0])
        raw = cases[int(case[-1])][0] * 80 + 400
        np.testing.assert_allclose(image, (raw - raw.mean()) / raw.std(), atol=1e-4)  # z-scored
        if i == 0:
            with h5py.File(root / gd.CASES_DIR / case / gd.CASE_FILE) as f:
                assert np.array_equal(f["label"][()], cases[0][1])


def test_the_run_takes_its_settings_from_the_folder(msd_run):
    """No --data, --num-classes or --labeled given: the folder's bcp_dataset.json says them."""
    cfg = json.loads((msd_run / "run" / "config.json").read_text())
    assert cfg["data"] == "LA_half" and cfg["class_names"] == ["atrium"] and cfg["labeled"] == 3
    assert cfg["eval_split"] == "val" and cfg["norm"] == "zscore" and cfg["width"] == 4  # flag wins
    metrics = json.loads((msd_run / "run" / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ["case_3"] and 0 <= metrics["dice"] <= 1


def test_predict_on_the_held_out_scans(msd, msd_run):
    """--predict DIR/imagesTs: one mask per scan on its own grid, volumes in mL from its spacing,
    the class named as dataset.json names it; the mask equals predict_volume on the scan
    normalised by the run's own norm, by the model the run scores (LA_half's: mirrored)."""
    src, _ = msd
    out = msd_run / "pred"
    assert bm.main(["--predict", str(src / "imagesTs"), "--ckpt", str(msd_run / "run" / "final.pt"),
                    "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert sorted(r["case"] for r in rows) == ["test_6", "test_7"]  # nnU-Net's _0000 dropped
    state = gd.load_checkpoint(msd_run / "run" / "final.pt")
    cfg = bm.config_from_checkpoint(state, {})
    assert cfg.eval_tta  # LA_half's settings: --predict mirrors as --eval scores
    model, name = bm.scored_model(cfg, state, bm.torch.device("cpu"))
    assert name == "student, mirrored"
    for r in rows:
        mask = nib.load(str(out / f"{r['case']}.nii.gz"))
        assert mask.shape == (24, 24, 16) and np.allclose(mask.affine, MR_AFFINE)
        assert r["class"] == "atrium"
        assert float(r["ml"]) == pytest.approx(int(r["voxels"]) * 1.5 * 1.5 * 3.0 / 1000, abs=1e-3)
        raw = np.asarray(nib.load(str(src / "imagesTs" / f"{r['case']}_0000.nii.gz")).dataobj)
        x = gd.normalize(raw, "zscore")
        want = bm.largest_per_class(bm.predict_volume(model.eval(), bm.torch.from_numpy(x), cfg)[None], 2)[0]
        assert np.array_equal(np.asarray(mask.dataobj), want.numpy())


def test_flags_win_over_the_folder_and_the_folder_over_the_preset(msd_run):
    root = str(msd_run / "data")
    assert bm.make_config("LA_half", root=root).labeled == 3  # folder over preset (4)
    assert bm.make_config("LA_half", root=root, labeled=2).labeled == 2  # flag over folder
    assert bm.make_config("LA_half").labeled == 4 and bm.make_config("LA_half").class_names == ()


def ct_phantom(image, label, rng):
    """Raw CT in HU (int16): air outside a body, soft tissue ~40 HU, the organ ~110 HU."""
    hu = np.full(image.shape, -1000.0)
    hu[2:-2, 2:-2, :] = 40 + 25 * image[2:-2, 2:-2, :]
    hu[label == 1] = 110 + 15 * rng.normal(size=int(label.sum()))
    return hu.astype(np.int16)


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    """An NIH Pancreas-CT-like release: PANCREAS_00NN.nii.gz scans (0.8 x 0.8 x 2 mm, HU) in
    one folder, TCIA labels label00NN.nii.gz (values 0 / 1) in another."""
    src = tmp_path_factory.mktemp("nih")
    (src / "data").mkdir()
    (src / "TCIA_pancreas_labels-02-05-2017").mkdir()
    rng = np.random.default_rng(5)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for i, (image, label) in enumerate(phantoms(7, 4, (40, 40, 16)), 1):
        nib.save(nib.Nifti1Image(ct_phantom(image, label, rng), affine),
                 str(src / "data" / f"PANCREAS_{i:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine),
                 str(src / "TCIA_pancreas_labels-02-05-2017" / f"label{i:04d}.nii.gz"))
    return src


def test_pancreas_end_to_end(nih, tmp_path, capsys):
    """get_data.py pancreas -> train (the Pancreas preset from the folder, a tiny budget) ->
    evaluate on val -> predict raw CT scans. The window is in config.json; --predict reads a
    raw scan exactly as get_data.py made the training case (normalise, resample to 1 mm)."""
    root = tmp_path / "Pancreas"
    assert gd.convert_pancreas(nih, root, n_test=2, val=1, progress=False) == root
    assert (root / "train.list").read_text().split() == [f"PANCREAS_{i:04d}" for i in range(1, 5)]
    assert (root / "val.list").read_text().split() == ["PANCREAS_0005"]
    assert (root / "test.list").read_text().split() == ["PANCREAS_0006", "PANCREAS_0007"]
    assert bm.main(["--root", str(root), "--out", str(tmp_path / "run"), "--labeled", "2", *TINY]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == "Pancreas" and cfg["norm"] == "ct" and cfg["window"] == [-125.0, 275.0]
    assert cfg["spacing"] == [1.0, 1.0, 1.0] and cfg["class_names"] == ["pancreas"]
    assert [c["case"] for c in json.loads((tmp_path / "run" / "metrics.json").read_text())["cases"]] == [
        "PANCREAS_0005"]
    # --predict normalises exactly as training did: the h5 case is a block of read_scan's image
    run_cfg = bm.config_from_checkpoint(gd.load_checkpoint(tmp_path / "run" / "final.pt"), {})
    scan = nih / "data" / "PANCREAS_0006.nii.gz"
    image = gd.read_scan(scan, run_cfg.norm, run_cfg.window, run_cfg.spacing)[0]
    tcia = nih / "TCIA_pancreas_labels-02-05-2017" / "label0006.nii.gz"
    label = gd.resample(np.asarray(nib.load(str(tcia)).dataobj), (0.8, 0.8, 2.0), label=True)
    assert image.shape == (32, 32, 32)  # 40 x 0.8 mm, 16 x 2 mm at 1 mm
    with h5py.File(root / gd.CASES_DIR / "PANCREAS_0006" / gd.CASE_FILE) as f:
        case, case_label = f["image"][()], f["label"][()]
    crop, crop_label = gd.crop_to_organ(image, label)
    assert np.array_equal(case, crop) and np.array_equal(case_label, crop_label)
    assert case.min() == 0 and case.max() <= 1  # air (-1000 HU) clipped to the window's 0
    out = tmp_path / "pred"
    assert bm.main(["--predict", str(nih / "data" / "PANCREAS_0007.nii.gz"), "--ckpt",
                    str(tmp_path / "run" / "final.pt"), "--out", str(out)]) == 0
    mask = nib.load(str(out / "PANCREAS_0007.nii.gz"))
    assert mask.shape == (40, 40, 16) and np.allclose(mask.affine, np.diag([0.8, 0.8, 2.0, 1.0]))
    assert "pancreas" in (out / "volumes.csv").read_text()


def test_crop_to_organ_by_hand():
    """CoraNet's crop along one axis: organ at 100..109 of 300 voxels -> grown by
    (96 - 9) // 2 + 25 = 68 each side: 32..177; near a border it stops at the border."""
    label = np.zeros((300, 4, 4), np.uint8)
    label[100:110, 1:3, 1:3] = 1
    image = np.arange(300 * 16, dtype=np.float32).reshape(300, 4, 4)
    crop, crop_label = gd.crop_to_organ(image, label)
    assert crop.shape == (145, 4, 4) and crop[0, 0, 0] == image[32, 0, 0]
    assert crop_label.sum() == label.sum()
    label[:] = 0
    label[5:8, 1, 1] = 1  # 5..7: grown by 47 + 25 = 72 -> 0..79
    assert gd.crop_to_organ(image, label)[0].shape == (79, 4, 4)


@pytest.mark.parametrize("problem", ["no dataset.json", "label shape", "4-D", "val too large", "label value"])
def test_bad_nifti_folders_are_named(msd, tmp_path, capsys, problem):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(msd[0], src)
    argv = ["nifti", "--src", str(src), "--root", str(tmp_path / "out")]
    bad = src / "labelsTr" / "case_1.nii.gz"
    if problem == "no dataset.json":
        (src / "dataset.json").unlink()
        bad = src / "dataset.json"
    elif problem == "label shape":
        nib.save(nib.Nifti1Image(np.zeros((24, 24, 15), np.uint8), MR_AFFINE), str(bad))
    elif problem == "label value":
        nib.save(nib.Nifti1Image(np.full((24, 24, 16), 2, np.uint8), MR_AFFINE), str(bad))
    elif problem == "4-D":
        bad = src / "imagesTr" / "case_2_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((24, 24, 16, 2), np.float32), MR_AFFINE), str(bad))
    else:
        argv += ["--val", "4"]
        bad = src
    assert gd.main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert {"no dataset.json": "labels", "label shape": "image's grid", "4-D": "_0000",
            "val too large": "labeled cases", "label value": "0..1"}[problem] in err


def test_eval_split_none_trains_and_says_so(msd, tmp_path, capsys):
    """A folder with no held-out labels (--val 0): training runs, nothing is scored, --eval
    asks for a split instead of failing on a missing list."""
    root = tmp_path / "data"
    gd.convert_nifti(msd[0], root, progress=False)
    assert not (root / "val.list").exists()
    assert bm.main(["--root", str(root), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "not scored" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) == {"train_seconds"}
    assert bm.main(["--eval", str(tmp_path / "run" / "final.pt")]) == 2
    assert "--eval-split" in capsys.readouterr().err


def test_a_folder_whose_scans_are_all_labeled_trains_a_fifth_as_labeled(msd, tmp_path, capsys):
    """Most MSD tasks label every training scan. BCP needs unlabeled ones: the first fifth (at
    least 1) train as labeled, the rest as unlabeled (their labels never read), said on screen;
    --labeled N chooses; `bcp_minimal.py --root OUT` then starts as the README says."""
    src, _ = msd
    full = tmp_path / "full"
    shutil.copytree(src, full)
    for p in (full / "imagesTr").glob("case_[45]_0000.nii.gz"):
        p.unlink()  # drop the two unlabeled scans: 4 scans, all labeled
    assert gd.main(["nifti", "--src", str(full), "--root", str(tmp_path / "d"), "--val", "1"]) == 0
    assert "the first 1 of 3 train as labeled" in capsys.readouterr().out
    meta = json.loads((tmp_path / "d" / gd.DATASET_FILE).read_text())["config"]
    assert meta["labeled"] == 1 and (tmp_path / "d" / "train.list").read_text().split() == [
        "case_0", "case_1", "case_2"]
    assert bm.main(["--root", str(tmp_path / "d"), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert gd.main(["nifti", "--src", str(full), "--root", str(tmp_path / "e"), "--val", "1",
                    "--labeled", "2"]) == 0
    assert json.loads((tmp_path / "e" / gd.DATASET_FILE).read_text())["config"]["labeled"] == 2
    assert gd.main(["nifti", "--src", str(full), "--root", str(tmp_path / "f"), "--labeled", "4"]) == 2
