"""The notebooks: committed with the outputs their own code made, and still running today.

`python notebooks/build.py` executes them in place and stamps each with the SHA-256 of its code
cells; the tests below fail when a committed notebook's code differs from what made its outputs,
when one shows no figure, and when it no longer runs (executed again, iteration literals shrunk).
"""
import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LITERAL, shrink = build.ITERS, build.shrink  # iteration literals, and setting them to 4
nbformat = pytest.importorskip("nbformat")


def images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def test_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_come_from_this_code(path):
    """Outputs are committed (GitHub shows the figures) and were made by these very code cells."""
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("bcp_minimal", {})
    assert stamp.get("code_sha256") == build.code_hash(nb), (
        f"{path.name}: its code changed since its outputs were made; run `python notebooks/build.py {path.name[:2]}`")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{path.name}: a code cell was never run"
    assert images(nb) >= 1, f"{path.name} shows no figure"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert build.timing_line(stamp["seconds"], stamp["ran_on"]) in nb.cells[0].source, (
        f"{path.name}: the title's time is not the recorded {stamp['seconds']} s; run "
        "`python notebooks/build.py --links-only`")


WIDGET = "application/vnd.jupyter.widget-view+json"


def widget_cells(nb):
    """Code cells that show a widget (by their stored output or by calling ipywidgets)."""
    return [c for c in nb.cells if c.cell_type == "code" and (
        "widgets." in c.source or any(WIDGET in o.get("data", {}) for o in c.get("outputs", [])))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_widget_cells_store_a_picture(path):
    """GitHub drops widget state (build.py removes it too): a slider shows nothing there, so each
    cell with a widget also stores a static image of what the widget shows."""
    nb = nbformat.read(path, as_version=4)
    for cell in widget_cells(nb):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), (
            f"{path.name}: the widget cell starting {cell.source[:60]!r} stores no image")


def test_code_hash_sees_a_changed_cell():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = build.code_hash(nb)
    next(c for c in nb.cells if c.cell_type == "code").source += "\n# changed"
    assert build.code_hash(nb) != before


def test_notebooks_stay_small():
    assert sum(p.stat().st_size for p in NOTEBOOKS) <= 5 * 2**20


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_skeleton_setup_cell_colab_link_and_exercises(path):
    """Title with its time on a laptop CPU and a Colab link from build.REPO; the set-up cell
    written from build.REPO; exercises with folded answers at the end."""
    nb = nbformat.read(path, as_version=4)
    title, setup, last = nb.cells[0], nb.cells[1], nb.cells[-1]
    assert title.cell_type == "markdown" and "laptop CPU" in title.source
    assert f"({build.colab_link(path.name)})" in title.source
    assert setup.source == build.SETUP.format(repo=build.REPO)
    assert last.source.startswith("## Exercises") and last.source.count("<details>") >= 2
    assert "../shared" not in path.read_text()


def test_readme_colab_links_follow_build_repo():
    """README.md links no notebook on Colab while REPO is the placeholder (such a link is a 404);
    any Colab link it has points where build.REPO says."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]*", readme)
    assert all(link == build.colab_link(link.rsplit("/", 1)[1]) for link in links)
    assert not (links and "/USER/" in build.REPO), "README links Colab to the placeholder REPO"


def test_setup_cell_explains_the_placeholder_on_colab(tmp_path, monkeypatch):
    """On Colab, outside a checkout, with REPO still the placeholder: a clear error, no clone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", object())
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *a, **k: calls.append(a))
    source = build.SETUP.format(repo="https://github.com/USER/bcp_minimal")
    with pytest.raises(RuntimeError, match="placeholder"):
        exec(compile(source, "setup", "exec"), {})
    assert calls == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source, cell.outputs = shrink(cell.source), []
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    assert images(nb) >= 2, "each notebook shows its figures"
