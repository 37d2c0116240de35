"""--download against a fake mirror on 127.0.0.1 (no test touches the internet)."""
import functools
import http.server
import shutil
import socket
import threading

import pytest

import bcp_minimal as bm


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
    assert bm.main(["--download", "--root", str(root), "--download-url", url]) == 0
    cases = (site / "train.list").read_text().split() + (site / "test.list").read_text().split()
    for c in cases:
        assert (root / bm.CASES_DIR / c / bm.CASE_FILE).read_bytes() == (site / bm.CASES_DIR / c / bm.CASE_FILE).read_bytes()
    assert len(hits) == 2 + len(cases)
    # resume: a missing and a truncated file are fetched again, complete files are skipped
    (root / bm.CASES_DIR / cases[0] / bm.CASE_FILE).unlink()
    broken = root / bm.CASES_DIR / cases[1] / bm.CASE_FILE
    broken.write_bytes(broken.read_bytes()[:100])
    hits.clear()
    assert bm.main(["--download", "--root", str(root), "--download-url", url]) == 0
    assert sorted(h for h in hits if h.endswith(".h5")) == sorted(
        f"/2018LA_Seg_Training%20Set/{c}/mri_norm2.h5" for c in cases[:2])
    assert bm._valid_case_file(broken)


def test_download_rejects_bad_file(mirror, tmp_path, capsys):
    url, site, hits = mirror
    case = (site / "train.list").read_text().split()[0]
    (site / bm.CASES_DIR / case / bm.CASE_FILE).write_bytes(b"<html>not found</html>")
    code = bm.main(["--download", "--root", str(tmp_path / "LA"), "--download-url", url])
    err = capsys.readouterr().err
    assert code == 2 and case in err and "not a valid LA case" in err
    assert not (tmp_path / "LA" / bm.CASES_DIR / case / bm.CASE_FILE).exists()


def test_download_offline_message(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    code = bm.main(["--download", "--root", str(tmp_path / "LA"), "--download-url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "offline" in err and "Traceback" not in err


def test_download_http_error(mirror, tmp_path, capsys):
    url, *_ = mirror
    code = bm.main(["--download", "--root", str(tmp_path / "LA"), "--download-url", url + "/missing"])
    assert code == 2 and "HTTP 404" in capsys.readouterr().err
