"""Bad input: exit status 2, one message naming the file and the fix, no traceback."""
import dataclasses
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT

import bcp_minimal as bm
import get_data as gd

FAST = ["--pretrain-iters", "1", "--selftrain-iters", "1", "--patch", "16", "16", "16", "--width", "2",
        "--batch-size", "8", "--eval-stride", "8", "8", "8", "--device", "cpu", "--log-every", "1",
        "--ckpt-every", "1"]


@pytest.fixture()
def data(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def run(capsys, *argv):
    code = bm.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def case_file(root, i=0):
    case = (root / "train.list").read_text().split()[i]
    return root / gd.CASES_DIR / case / gd.CASE_FILE


def test_missing_root(capsys, tmp_path):
    code, err = run(capsys, "--root", tmp_path / "nowhere", "--out", tmp_path / "o", *FAST)
    assert code == 2 and "nowhere" in err and "get_data.py" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["train.list", "test.list"])
def test_missing_list(capsys, data, tmp_path, name):
    (data / name).unlink()
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and name in err


def test_list_names_missing_case(capsys, data, tmp_path):
    with open(data / "train.list", "a") as f:
        f.write("GHOSTCASE\n")
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and "GHOSTCASE" in err and "remove it from the list" in err


@pytest.mark.parametrize("key", ["image", "label"])
def test_h5_without_key(capsys, data, tmp_path, key):
    path = case_file(data)
    with h5py.File(path, "a") as f:
        del f[key]
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and str(path) in err and repr(key) in err


def test_corrupt_h5(capsys, data, tmp_path):
    path = case_file(data, 1)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])  # truncated
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and str(path) in err and "corrupt" in err


def _rewrite(path, image=None, label=None):
    with h5py.File(path, "r") as f:
        im, lb = f["image"][()], f["label"][()]
    with h5py.File(path, "w") as f:
        f["image"] = im if image is None else image(im)
        f["label"] = lb if label is None else label(lb)


def test_label_out_of_range(capsys, data, tmp_path):
    path = case_file(data)
    _rewrite(path, label=lambda lb: np.where(lb > 0, 7, 0).astype(np.uint8))
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and str(path) in err and "[0, 7]" in err and "2 classes allow 0..1" in err


def test_shape_mismatch(capsys, data, tmp_path):
    path = case_file(data)
    _rewrite(path, label=lambda lb: lb[:-1])
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and str(path) in err and "shape" in err


def test_nan_in_image(capsys, data, tmp_path):
    path = case_file(data)

    def poison(im):
        im = im.copy()
        im[3, 3, 3] = np.nan
        return im
    _rewrite(path, image=poison)
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", *FAST)
    assert code == 2 and str(path) in err and "NaN" in err


def test_too_many_labeled(capsys, data, tmp_path):
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", "--labeled", 99, *FAST)
    assert code == 2 and "--labeled 99" in err and str(data) in err and "6 training cases" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--beta", "1.5", "--beta"), ("--beta", "0", "--beta"), ("--alpha", "-1", "--alpha"),
    ("--batch-size", "6", "--batch-size"), ("--batch-size", "3", "--batch-size"),
    ("--dropout", "1", "--dropout"), ("--dropout", "-0.1", "--dropout"),
])
def test_argument_errors_before_any_work(capsys, tmp_path, flag, value, needle):
    # the root does not even exist: argument checks come first
    code, err = run(capsys, "--root", tmp_path / "nowhere", "--out", tmp_path / "o", *FAST, flag, value)
    assert code == 2 and needle in err and "no folder" not in err
    assert not (tmp_path / "o").exists()


def test_patch_not_divisible(capsys, tmp_path):
    code, err = run(capsys, "--out", tmp_path / "o", *FAST, "--patch", "20", "16", "16")
    assert code == 2 and "--patch 20 16 16" in err and "a positive multiple of 16" in err


def test_volume_smaller_than_patch_is_padded(capsys, tmp_path):
    from make_samples import make_sample_data

    root = make_sample_data(tmp_path / "small", n_train=4, n_test=1, n_val=0, shape=(10, 12, 7))
    code, err = run(capsys, "--root", root, "--out", tmp_path / "o", *FAST)
    assert code == 0, err
    assert (tmp_path / "o" / "metrics.json").exists()


def test_truncated_checkpoint_to_eval(capsys, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, err = run(capsys, "--eval", bad, "--out", tmp_path / "o")
    assert code == 2 and str(bad) in err and "truncated or foreign" in err


def test_foreign_checkpoint(capsys, tmp_path):
    import torch

    bad = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, bad)
    code, err = run(capsys, "--eval", bad, "--out", tmp_path / "o")
    assert code == 2 and str(bad) in err and "not a bcp_minimal checkpoint" in err


def test_resume_refuses_corrupt_checkpoint_and_keeps_it(capsys, data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt_last.pt").write_bytes(b"garbage")
    code, err = run(capsys, "--root", data, "--out", out, "--resume", *FAST)
    assert code == 2 and "ckpt_last.pt" in err
    assert (out / "ckpt_last.pt").read_bytes() == b"garbage"  # never overwritten


def test_resume_without_checkpoint(capsys, data, tmp_path):
    code, err = run(capsys, "--root", data, "--out", tmp_path / "o", "--resume", *FAST)
    assert code == 2 and "no checkpoint" in err


def test_command_line_error_has_no_traceback(data, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--root", str(tmp_path / "x"), *FAST],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_resume_uses_the_runs_own_root(capsys, data, tmp_path):
    """--resume without --root must find the data of the original run, not the preset's."""
    out = tmp_path / "o"
    assert run(capsys, "--root", data, "--out", out, *FAST)[0] == 0
    logged = (out / "log.csv").read_text()
    code, err = run(capsys, "--out", out, "--resume", "--device", "cpu")
    assert code == 0, err
    assert (out / "log.csv").read_text() == logged  # finished: nothing re-trained or re-logged
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["cases"]) == len((data / "test.list").read_text().split())  # its own test.list


def test_resume_refuses_to_change_the_method(capsys, data, tmp_path):
    out = tmp_path / "o"
    assert run(capsys, "--root", data, "--out", out, *FAST)[0] == 0
    code, err = run(capsys, "--out", out, "--resume", "--lr", "0.5")
    assert code == 2 and "--lr: fixed by the checkpoint's run" in err


def test_la_preset_fetches_a_missing_default_root(capsys, tmp_path, monkeypatch):
    """`--data LA` with its default root absent fetches it (get_data.prepare); an explicit
    --root that does not exist stays an error (test_missing_root)."""
    import get_data

    calls = []

    def fake_prepare(preset, root):
        calls.append((preset, root))
        raise gd.UserError("offline in this test")

    monkeypatch.setattr(get_data, "prepare", fake_prepare)
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "--data", "LA", *FAST)
    assert code == 2 and calls == [("LA", "data/LA")] and "offline in this test" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: no process downloads, each says how
    code, err = run(capsys, "--data", "LA_half", *FAST)
    assert code == 2 and len(calls) == 1 and "python get_data.py LA_half --root data/LA_half" in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        bm.main(["--help"])
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(bm.Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out and f.metadata["help"].split()[0] in out
    for flag in ("--resume", "--eval"):
        assert flag in out
    assert "2-D" in out and "3-D" in out


@pytest.mark.parametrize("data", ["sample", "LA_half", "ACDC_cpu"])
def test_help_shows_each_flags_default_for_the_chosen_preset(capsys, data):
    """`--data NAME --help`: every flag's help ends in that preset's default, not the dict."""
    with pytest.raises(SystemExit):
        bm.main(["--data", data, "--help"])
    out = capsys.readouterr().out
    entries = {e.split()[0]: " ".join(e.split()) for e in out.split("\n  --")[1:]}  # flag -> help
    cfg = bm.make_config(data)
    for flag, want in [("patch", " ".join(map(str, cfg.patch))), ("root", cfg.root),
                       ("pretrain-iters", str(cfg.pretrain_iters)), ("lr-step", str(cfg.lr_step)),
                       ("dropout", f"{cfg.dropout:.4g}"), ("eval-split", cfg.eval_split)]:
        assert entries[flag].endswith(f"[default: {want}]"), (flag, entries[flag], want)
    assert sum("[default: " in e for e in entries.values()) == len(bm.dataclasses.fields(bm.Config))
    assert "'pretrain_iters'" not in out  # not the PRESETS dict


@pytest.mark.parametrize("flag,value,needle", [
    ("--ckpt-every", "7", "--ckpt-every 7: a multiple of --log-every"),
    ("--lr", "0", "--lr"), ("--labeled", "0", "--labeled"), ("--width", "0", "--width"),
    ("--ema-decay", "1.5", "--ema-decay in [0, 1]"), ("--eval-stride", "8 8", "--eval-stride: X Y Z"),
    ("--selftrain-iters", "-1", "iterations >= 0"), ("--rotate", "200", "--rotate 200: degrees"),
])
def test_every_config_check_names_its_flag(capsys, tmp_path, flag, value, needle):
    code, err = run(capsys, "--root", tmp_path / "nowhere", "--out", tmp_path / "o", *FAST,
                    "--log-every", "2", flag, *value.split())
    assert code == 2 and needle in err and "no folder" not in err


def test_resume_with_another_number_of_processes_is_refused(capsys, data, tmp_path):
    out = tmp_path / "o"
    assert run(capsys, "--root", data, "--out", out, *FAST)[0] == 0
    state = torch.load(out / "ckpt_last.pt", weights_only=False)
    state["rng"] = state["rng"] * 2  # as if written by 2 torchrun processes
    torch.save(state, out / "ckpt_last.pt")
    code, err = run(capsys, "--out", out, "--resume", "--device", "cpu")
    assert code == 2 and "the run had 2 processes, not 1" in err


def test_a_checkpoint_from_before_rotate_keeps_its_augmentation_and_scoring(monkeypatch):
    # ACDC presets now draw the official ACDC poses (rotate 20); a run saved before the field
    # existed drew rotate 0's, and resuming or evaluating it must not change that
    saved = dataclasses.asdict(bm.make_config("ACDC_cpu"))
    del saved["rotate"]
    assert bm.config_from_checkpoint({"cfg": saved}, {}).rotate == 0
    assert bm.config_from_checkpoint({"cfg": {**saved, "rotate": 20}}, {}).rotate == 20
    with pytest.raises(gd.UserError, match="--rotate: fixed by the checkpoint"):
        bm.config_from_checkpoint({"cfg": saved}, {"rotate": 20})
    # likewise mirror TTA (ACDC_cpu's default now): an older run is scored as it was, unless asked
    assert bm.make_config("ACDC_cpu").eval_tta and bm.make_config("LA_half").eval_tta
    assert not bm.make_config("LA").eval_tta and not bm.make_config("sample").eval_tta
    del saved["eval_tta"]
    assert not bm.config_from_checkpoint({"cfg": saved}, {}).eval_tta
    assert bm.config_from_checkpoint({"cfg": saved}, {"eval_tta": True}).eval_tta
    # and the network: a run saved before --top-convs had two convolutions at the top level,
    # also if its preset has one now
    monkeypatch.setitem(bm.PRESETS, "ACDC_cpu", {**bm.PRESETS["ACDC_cpu"], "top_convs": 1})
    del saved["top_convs"]
    assert bm.config_from_checkpoint({"cfg": saved}, {}).top_convs == 2
    with pytest.raises(gd.UserError, match="--top-convs: fixed by the checkpoint"):
        bm.config_from_checkpoint({"cfg": saved}, {"top_convs": 1})
    # and before --skip, concatenated its skips
    monkeypatch.setitem(bm.PRESETS, "ACDC_cpu", {**bm.PRESETS["ACDC_cpu"], "skip": "add"})
    del saved["skip"]
    assert bm.config_from_checkpoint({"cfg": saved}, {}).skip == "concat"
    with pytest.raises(gd.UserError, match="--skip: fixed by the checkpoint"):
        bm.config_from_checkpoint({"cfg": saved}, {"skip": "add"})
