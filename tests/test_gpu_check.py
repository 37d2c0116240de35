"""benchmark.py --gpu-check as a dry run on the CPU: 2 iterations, a fake official tree (no test
needs the official code), one notebook: the table's rows, each filled."""
import json

import benchmark

FAKE_TRAIN = '''
import argparse, logging, os, time
patch_size = (112, 112, 80)
loader = dict(num_workers=4, pin_memory=True)
p = argparse.ArgumentParser()
for f in ("--root_path", "--labelnum", "--max_samples", "--pre_max_iteration",
          "--self_max_iteration", "--seed"):
    p.add_argument(f)
args = p.parse_args()
assert tuple(int(v) for v in os.environ["BCP_PATCH"].split(",")) == (32, 32, 32)
assert os.path.isfile(os.path.join(args.root_path, "train.list"))

def pre_train(args, path):
    for i in range(1, int(args.pre_max_iteration) + 1):
        time.sleep(0.01)
        logging.info("iteration %d : loss 1.0", i)

def self_train(args, pre, path):
    for i in range(1, int(args.self_max_iteration) + 1):
        time.sleep(0.02)
        logging.info("iteration %d : loss 1.0", i)
def never_called(iter_num):
    if iter_num % 200 == 0:
        pass
'''


def fake_official(root):
    code = root / "code"
    (code / "utils").mkdir(parents=True)
    (code / "LA_BCP_train.py").write_text("import imp\nfrom asyncore import write\n" + FAKE_TRAIN)
    (code / "utils" / "BCP_utils.py").write_text("\n".join(
        old for rel, old, _, _ in benchmark.OFFICIAL_PATCHES if rel == "utils/BCP_utils.py"))
    (code / "utils" / "test_3d_patch.py").write_text("def var_all_case_LA(*a, **k):\n    return 0\n")
    return root


def test_gpu_check_dry_run_prints_one_table(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(benchmark, "run_notebook", lambda name, shrink=False: ran.append((name, shrink)) or 12.0)
    rows = benchmark.main(["--gpu-check", "--device", "cpu", "--iters", "2", "--warmup", "1",
                           "--patch", "32", "32", "32", "--official", str(fake_official(tmp_path / "BCP")),
                           "--work", str(tmp_path / "w")])
    keys = list(rows)
    assert keys[:3] == ["device", "torch, Python", "--amp auto picks"]
    assert keys[3].startswith("bcp_minimal LA step ((32, 32, 32), batch 8, --top-convs 1 --skip add)")
    assert [k.split(" (")[0] for k in keys[4:]] == [
        "peak memory", "the paper's 2 000 + 15 000 iterations, projected",
        "official LA_BCP_train.py step", "bcp_minimal / official time per iteration, pre / self",
        "notebook 02_copy_paste executed"]
    assert rows["--amp auto picks"] in ("fp32", "bf16") and rows[keys[3]].endswith(" it/s")
    assert ran == [("02_copy_paste", True)]  # shrunk: a dry run
    out = capsys.readouterr().out
    assert "| GPU check | |" in out and all(f"| {k} | {v} |" in out for k, v in rows.items())
    assert json.loads((tmp_path / "w" / "gpu_check.json").read_text()) == rows


def test_run_notebook_executes_a_copy_with_iterations_shrunk(monkeypatch):
    seen = {}

    class Client:
        def __init__(self, nb, **kw):
            seen["src"] = "\n".join(c.source for c in nb.cells if c.cell_type == "code")

        def execute(self):
            pass

    import nbclient
    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    benchmark.run_notebook("04_training", shrink=True)
    assert "iters = 4" in seen["src"] and benchmark.NOTEBOOK_ITERS.search(seen["src"]).group(0).endswith("= 4")


def test_drivers_stand_in_for_the_modules_python_312_removed(tmp_path):
    """The official scripts start with `from asyncore import write` and `import imp` (unused);
    where those modules are gone (Python 3.12, simulated here), the drivers' prelude supplies them."""
    import subprocess
    import sys
    code = ("import sys\nsys.modules['asyncore'] = None\nsys.modules['imp'] = None\n"
            + benchmark.DRIVER_PRELUDE + "\nfrom asyncore import write\nimport imp\nprint('ran')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr[-800:]
    r = subprocess.run([sys.executable, "-c", code.replace(benchmark.DRIVER_PRELUDE, "")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0  # without it, the import fails
