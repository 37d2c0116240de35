import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data_samples"))
SHARED_DATA = ROOT.parent / "shared" / "data"

from make_samples import make_sample_data  # noqa: E402

import bcp_minimal as bm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """6 train + 2 test + 2 val phantoms of 24x24x16 voxels in the official layout."""
    root = tmp_path_factory.mktemp("tiny")
    return make_sample_data(root, n_train=6, n_test=2, n_val=2, shape=(24, 24, 16), seed=1)


def tiny_cfg(root, out, **kw):
    base = dict(root=str(root), out=str(out), labeled=2, pretrain_iters=3, selftrain_iters=4,
                patch=(16, 16, 16), batch_size=8, width=2, log_every=1, ckpt_every=2,
                eval_stride=(8, 8, 8), device="cpu")
    base.update(kw)
    return bm.make_config("sample", **base)


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """One small trained run (20 + 20 iterations) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run")
    bm.train(tiny_cfg(tiny_data, out, pretrain_iters=20, selftrain_iters=20, width=4), progress=False)
    return out / "final.pt"
