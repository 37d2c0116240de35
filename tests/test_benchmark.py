"""The benchmark script runs end to end on a tiny config (its numbers are not asserted: timings
belong in the script's output, not in tests)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--patch", "16", "16", "16", "--width", "2",
                        "--iters", "1", "--warmup", "1", "--root", str(ROOT / "data_samples"), "--baseline",
                        "--eval-root", str(ROOT / "data_samples"), "--eval-patch", "16", "16", "16",
                        "--eval-stride", "16", "16", "16", "--metrics", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    names = [x.get("name") for x in res]
    assert "bcp_minimal self-training" in names and "official-style pipeline" in names
    parts = res[1]["parts_share"]
    assert set(parts) == {"data", "teacher forward", "pseudo-labels", "mix", "student forward/backward/step", "EMA"}
    assert res[-1]["hd95_asd_vs_medpy"]["same"] is True
