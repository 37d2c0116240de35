"""get_data.py against a fake mirror on 127.0.0.1 (no test touches the internet)."""
import functools
import http.server
import shutil
import socket
import threading

import pytest
from conftest import ROOT

import get_data as gd


@pytest.fixture()
def mirror(tiny_data, tmp_path):
    """Serve a copy of the tiny data set as the UA-MT data/ folder; count the requests."""
    site = tmp_path / "site"
    shutil.copytree(tiny_data, site)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", site, hits
    server.shutdown()
    server.server_close()


def test_download_resumable_and_checked(mirror, tmp_path, capsys):
    url, site, hits = mirror
    root = tmp_path / "LA"
    assert gd.main(["LA", "--root", str(root), "--url", url]) == 0
    cases = (site / "train.list").read_text().split() + (site / "test.list").read_text().split()
    for c in cases:
        assert (root / gd.CASES_DIR / c / gd.CASE_FILE).read_bytes() == (site / gd.CASES_DIR / c / gd.CASE_FILE).read_bytes()
    assert len(hits) == 2 + len(cases)
    # resume: a missing and a truncated file are fetched again, complete files are skipped
    (root / gd.CASES_DIR / cases[0] / gd.CASE_FILE).unlink()
    broken = root / gd.CASES_DIR / cases[1] / gd.CASE_FILE
    broken.write_bytes(broken.read_bytes()[:100])
    hits.clear()
    assert gd.main(["LA", "--root", str(root), "--url", url]) == 0
    assert sorted(h for h in hits if h.endswith(".h5")) == sorted(
        f"/2018LA_Seg_Training%20Set/{c}/mri_norm2.h5" for c in cases[:2])
    assert gd._valid_case_file(broken)


def test_download_rejects_bad_file(mirror, tmp_path, capsys):
    url, site, hits = mirror
    case = (site / "train.list").read_text().split()[0]
    (site / gd.CASES_DIR / case / gd.CASE_FILE).write_bytes(b"<html>not found</html>")
    code = gd.main(["LA", "--root", str(tmp_path / "LA"), "--url", url])
    err = capsys.readouterr().err
    assert code == 2 and case in err and "not a valid LA case" in err
    assert not (tmp_path / "LA" / gd.CASES_DIR / case / gd.CASE_FILE).exists()


def test_download_offline_message(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    code = gd.main(["LA", "--root", str(tmp_path / "LA"), "--url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "offline" in err and "Traceback" not in err


def test_download_http_error(mirror, tmp_path, capsys):
    url, *_ = mirror
    code = gd.main(["LA", "--root", str(tmp_path / "LA"), "--url", url + "/missing"])
    assert code == 2 and "HTTP 404" in capsys.readouterr().err


def test_make_half_is_trilinear_and_thresholded(tiny_data, tmp_path):
    """LA_half = every axis halved (floor), trilinear image, trilinear label >= 0.5, same lists."""
    import h5py
    import numpy as np
    import torch
    import torch.nn.functional as F

    assert gd.main(["LA_half", "--src", str(tiny_data), "--root", str(tmp_path / "half")]) == 0
    half = tmp_path / "half"
    assert (half / "train.list").read_text() == (tiny_data / "train.list").read_text()
    case = (tiny_data / "test.list").read_text().split()[0]
    with h5py.File(tiny_data / gd.CASES_DIR / case / gd.CASE_FILE) as f:
        im, lb = f["image"][()], f["label"][()]
    with h5py.File(half / gd.CASES_DIR / case / gd.CASE_FILE) as f:
        him, hlb = f["image"][()], f["label"][()]
    assert him.shape == hlb.shape == tuple(s // 2 for s in im.shape) and hlb.dtype == np.uint8
    # a 2x2x2 block average is what trilinear at exactly half size with align_corners=False is
    np.testing.assert_allclose(him[1, 2, 3], im[2:4, 4:6, 6:8].mean(), rtol=1e-5)
    ref = F.interpolate(torch.from_numpy(lb.astype(np.float32))[None, None], size=him.shape, mode="trilinear")
    np.testing.assert_array_equal(hlb, (ref[0, 0].numpy() >= 0.5).astype(np.uint8))


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "LA_sample").is_dir(), reason="no ../shared")
def test_make_half_reproduces_the_shared_la_half(tmp_path):
    """The development copy ../shared/data/LA_half was made the same way (checked on one case)."""
    import h5py
    import numpy as np

    shared = ROOT.parent / "shared" / "data"
    src = tmp_path / "one"
    case = (shared / "LA_sample" / "train.list").read_text().split()[0]
    (src / gd.CASES_DIR).mkdir(parents=True)
    shutil.copytree(shared / "LA_sample" / gd.CASES_DIR / case, src / gd.CASES_DIR / case)
    (src / "train.list").write_text(case + "\n")
    gd.make_half(src, tmp_path / "half", progress=False)
    for key in ("image", "label"):
        with h5py.File(tmp_path / "half" / gd.CASES_DIR / case / gd.CASE_FILE) as a, \
                h5py.File(shared / "LA_half" / gd.CASES_DIR / case / gd.CASE_FILE) as b:
            np.testing.assert_array_equal(a[key][()], b[key][()])


def test_acdc_zip_download_unpacks_a_nested_folder(tmp_path):
    """get_data.py ACDC --url: a zip whose ACDC folder sits one level down, served on 127.0.0.1."""
    import zipfile

    from test_acdc import make_acdc

    src = make_acdc(tmp_path / "src" / "ACDC")
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "acdc.zip", "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(tmp_path / "src"))
    (site / "bad.zip").write_bytes(b"<html>a login page</html>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        root = tmp_path / "ACDC"
        assert gd.main(["ACDC", "--url", f"{url}/acdc.zip", "--root", str(root)]) == 0
        assert (root / "train_slices.list").read_text() == (src / "train_slices.list").read_text()
        assert gd.load_split(root, "val", 4)[1][0].ndim == 3 and not (root / "acdc.zip").exists()
        assert gd.main(["ACDC", "--url", f"{url}/bad.zip", "--root", str(tmp_path / "b")]) == 2
        assert gd.main(["ACDC", "--root", str(tmp_path / "c")]) == 2  # no URL: where to get it
    finally:
        server.shutdown()
        server.server_close()


def test_val_holds_out_the_last_cases_of_train_list(mirror, tmp_path):
    """get_data.py LA --val N: val.list = the last N cases of train.list, train.list the rest,
    test.list untouched; LA_half of that folder keeps the three lists."""
    url, site, _ = mirror
    root = tmp_path / "LA"
    assert gd.main(["LA", "--root", str(root), "--url", url, "--val", "2"]) == 0
    train = (site / "train.list").read_text().split()
    assert (root / "train.list").read_text().split() == train[:-2]
    assert (root / "val.list").read_text().split() == train[-2:]
    assert (root / "test.list").read_text() == (site / "test.list").read_text()
    assert gd.main(["LA_half", "--src", str(root), "--root", str(tmp_path / "half")]) == 0
    for name in ("train.list", "val.list", "test.list"):
        assert (tmp_path / "half" / name).read_text() == (root / name).read_text()
    assert gd.main(["LA", "--root", str(tmp_path / "x"), "--url", url, "--val", str(len(train))]) == 2
