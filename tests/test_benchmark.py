"""benchmark.py runs end to end on a tiny config and times the real training step (its numbers
are not asserted: timings belong in the script's output, not in tests)."""
import json

from conftest import ROOT

import bcp_minimal as bm
import benchmark


def test_benchmark_times_the_real_step(tmp_path, monkeypatch):
    calls = []
    real = bm.train_step
    monkeypatch.setattr(bm, "train_step", lambda run, stage: (calls.append(stage), real(run, stage))[1])
    out = tmp_path / "bench.json"
    benchmark.main(["--patch", "16", "16", "16", "--width", "2", "--iters", "1", "--warmup", "1",
                    "--root", str(ROOT / "data_samples"), "--eval-root", str(ROOT / "data_samples"),
                    "--eval-patch", "16", "16", "16", "--eval-stride", "16", "16", "16", "--metrics",
                    "--device", "cpu", "--json", str(out)])
    assert calls == ["pretrain"] * 2 + ["selftrain"] * 2  # warm-up + timed, of bm.train_step itself
    res = json.loads(out.read_text())
    assert set(res["steps"]) == {"pretrain_s_per_it", "selftrain_s_per_it"}
    assert abs(sum(p["share"] for p in res["selftrain_parts"].values()) - 1) < 1e-6
    assert res["hd95_asd_vs_medpy"]["same"] is True
