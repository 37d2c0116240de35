"""How the project's files depend on each other: imports point one way (get_data.py imports no
project file, bcp_minimal.py only get_data.py), each thing written once, and the module short
enough to read in one sitting."""
import ast
import os
import subprocess
import sys

from conftest import ROOT

PROJECT = {p.stem for p in ROOT.glob("*.py")}
CODE = [p for p in [*ROOT.glob("*.py"), *ROOT.glob("notebooks/*.py"), *ROOT.glob("docs/*.py"),
                    *ROOT.glob("data_samples/*.py")]]


def imports(path):
    """Every module a file imports, lazily inside functions too."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_imports_point_one_way():
    deps = {p.stem: imports(p) & PROJECT - {p.stem} for p in ROOT.glob("*.py")}
    assert deps["get_data"] == set()
    assert deps["bcp_minimal"] == {"get_data"}
    for a, uses in deps.items():  # no file imports one that imports it back
        for b in uses:
            assert a not in deps.get(b, set()), (a, b)


def test_module_fits_one_sitting():
    lines = (ROOT / "bcp_minimal.py").read_text().splitlines()
    assert len(lines) <= 900
    assert max(map(len, lines)) <= 100


def test_readme_fits_its_budget():
    """The README is read whole by a newcomer: at most 20 000 bytes (new text replaces old)."""
    assert len((ROOT / "README.md").read_bytes()) <= 20_000


def test_one_nifti_reader_and_one_ct_window():
    """In the code (not its prose): nib.load called once (get_data.read_nifti), the CT window's
    -125 written once (get_data.CT_WINDOW)."""
    loads = windows = 0
    for p in CODE:
        for n in ast.walk(ast.parse(p.read_text())):
            loads += isinstance(n, ast.Attribute) and n.attr == "load" and getattr(n.value, "id", "") == "nib"
            windows += (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub)
                        and getattr(n.operand, "value", None) == 125)
    assert (loads, windows) == (1, 1)


def test_la_preset_offline_ends_in_one_error_line(tmp_path):
    """`python bcp_minimal.py --data LA` in a folder without data/LA fetches it; offline (here a
    proxy that refuses), the download's error is the one line `error: ...`, exit status 2, not a
    traceback (the error class is get_data's alone)."""
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
    r = subprocess.run([sys.executable, str(ROOT / "bcp_minimal.py"), "--data", "LA"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-1500:]
    assert err[-1].startswith("error: download ") and "cannot connect" in err[-1]
    assert "Traceback" not in r.stderr
