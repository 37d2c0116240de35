"""The distribution-gap measure (paper Fig. 5): which pixels, which features, and the Fréchet
distance against hand computations."""
import numpy as np
import pytest
import torch

import bcp_minimal as bm
import plots


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert plots.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # one channel: (mu_a - mu_b)^2 + (s_a - s_b)^2 for Gaussians
    x = np.array([0.0, 1, 2, 3, 4])[:, None]
    y = 2 * x + 5
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert plots.frechet_distance(x, y) == pytest.approx(want)


def test_pixel_features_are_the_head_input_where_prediction_and_truth_agree():
    torch.manual_seed(0)
    model = bm.UNet(1, 2, width=2, dims=2)
    image = torch.randn(32, 32)
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(x=i[0][0], pred=o[0].argmax(0)))
    model.eval()
    model(image[None, None])
    label = seen["pred"].clone()
    label[:16] = 1 - label[:16]  # the top half disagrees with the prediction
    cls = int(seen["pred"][16:].flatten().mode().values)  # a class the bottom half predicts
    f = plots.pixel_features(model, [image], [label], cls=cls, n=10**6)
    ok = (seen["pred"] == cls) & (label == cls)
    assert f.shape == (int(ok.sum()), 2) and ok[:16].sum() == 0
    want = seen["x"][:, ok].T.numpy()
    assert np.allclose(np.sort(f, 0), np.sort(want, 0))
    assert len(want) > 5 and len(plots.pixel_features(model, [image], [label], cls, n=5)) == 5
    fig = plots.show_gap({"a": (f, f + 1)})
    assert "Fréchet" in fig.axes[0].get_title()
