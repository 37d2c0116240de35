"""The trained models bundled in models/: each loads as a checkpoint; the sample one scores on
data_samples/ what models.json records for those exact fp16 weights (`--eval` as a user runs it)."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import get_data as gd

RECORDS = json.loads((ROOT / "models" / "models.json").read_text())


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_each_bundle_is_a_small_fp16_student_checkpoint(name):
    path = ROOT / "models" / RECORDS[name]["file"]
    assert path.stat().st_size <= 5e6
    state = gd.load_checkpoint(path)
    assert state["teacher"] is None and state["optimizer"] is None
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)


@pytest.mark.parametrize("name", [n for n in sorted(RECORDS) if RECORDS[n]["root"] == "data_samples"])
def test_a_sample_bundle_scores_its_record_on_data_samples(name, tmp_path):
    rec = RECORDS[name]
    ckpt = tmp_path / rec["file"]
    ckpt.write_bytes((ROOT / "models" / rec["file"]).read_bytes())  # --eval writes beside it
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--eval", str(ckpt),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    m = json.loads((tmp_path / f"eval_{ckpt.stem}" / "metrics.json").read_text())
    assert m["dice"] == pytest.approx(rec["dice"], abs=0.01)
    assert m["hd95"] == pytest.approx(rec["hd95"], abs=0.5)
