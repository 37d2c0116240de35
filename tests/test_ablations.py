"""The paper's ablations as flags on the one training path: each --direction's mixes, labels,
regions and weights; copy-paste in pre-training off; the mask's shapes. Crops of value +1 are
labeled (ground truth 1), of value -1 unlabeled (the fake teacher's pseudo-label: 0), so every
voxel of a mix says where it came from."""
import pytest
import torch
from test_step import Const, cfg, samplers

import bcp_minimal as bm

P = (16, 16, 16)
ALPHA = 0.3


def batch(direction, **kw):
    lab, unl, g = samplers()
    return bm.selftrain_batch(lab, unl, Const(k=0), cfg(direction=direction, alpha=ALPHA, **kw), g)


def kinds(targets):
    """(outer target, inner target, w_o, w_i) -> ('gt' | 'pseudo' per target, weights)."""
    yo, yi, wo, wi = targets
    kind = lambda t: "gt" if (t == 1).all() else "pseudo" if (t == 0).all() else "mixed"  # noqa: E731
    return kind(yo), kind(yi), wo, wi


# direction -> per mix: (image outside the box, image inside the box) as +1 / -1, targets' kinds
# and weights (labeled: 1, pseudo-labeled: alpha)
WANT = {
    "both": [((1, -1), ("gt", "pseudo", 1.0, ALPHA)), ((-1, 1), ("pseudo", "gt", ALPHA, 1.0))],
    "in": [((1, -1), ("gt", "pseudo", 1.0, ALPHA)), ((1, -1), ("gt", "pseudo", 1.0, ALPHA))],
    "out": [((-1, 1), ("pseudo", "gt", ALPHA, 1.0)), ((-1, 1), ("pseudo", "gt", ALPHA, 1.0))],
    "within": [((1, 1), ("gt", "gt", 1.0, 1.0)), ((-1, -1), ("pseudo", "pseudo", ALPHA, ALPHA))],
    "none": [((1, 1), ("gt", "gt", 1.0, 1.0)), ((-1, -1), ("pseudo", "pseudo", ALPHA, ALPHA))],
}


@pytest.mark.parametrize("direction", list(WANT))
def test_each_direction_mixes_the_crops_labels_and_weights_it_names(direction):
    b = batch(direction)
    M = b["M"]
    if direction == "none":  # no copy-paste: no box, each crop as it is
        assert (M == 1).all()
    else:
        assert (M == 0).any() and (M == 1).any()
    for name, ((out_v, in_v), want) in zip(("in", "out"), WANT[direction]):
        x, y = b[f"x_{name}"][:, 0], b[f"y_{name}"]
        assert torch.equal(x, (out_v * M + in_v * (1 - M)).expand_as(x)), name
        out_y, in_y = (1 if v == 1 else 0 for v in (out_v, in_v))  # gt 1, pseudo-label 0
        assert torch.equal(y, (out_y * M + in_y * (1 - M)).long().expand_as(y)), name
        assert kinds(b[f"targets_{name}"]) == want, name


@pytest.mark.parametrize("direction", list(WANT))
def test_stage_loss_hands_bcp_loss_each_mixes_targets_region_and_weights(monkeypatch, direction):
    seen, real = [], bm.bcp_loss
    monkeypatch.setattr(bm, "bcp_loss", lambda q, yo, yi, M, wo, wi: seen.append(
        (kinds((yo, yi, wo, wi)), M.clone())) or real(q, yo, yi, M, wo, wi))
    lab, unl, g = samplers()
    c = cfg(direction=direction, alpha=ALPHA, width=2)
    model = bm.make_model(c)
    loss, terms = bm.stage_loss("selftrain", model, Const(k=0), lab, unl, c, g)
    assert [k for k, _ in seen] == [w for _, w in WANT[direction]]
    assert torch.equal(seen[0][1], seen[1][1])  # one mask for both mixes
    assert torch.allclose(loss, terms["loss_in"] + terms["loss_out"])


def test_no_copy_paste_is_the_mean_teacher_loss_by_hand():
    """--direction none: (CE + Dice) / 2 of the labeled crop against ground truth over the whole
    crop, plus alpha times the same of the unlabeled crop against its pseudo-labels."""
    b = batch("none")
    q = torch.randn(2, 2, *P)
    yo, yi, wo, wi = b["targets_in"]
    got = bm.bcp_loss(q, yo, yi, b["M"], wo, wi)
    assert torch.allclose(got, bm.seg_loss(q, b["y_a"]))
    yo, yi, wo, wi = b["targets_out"]
    got = bm.bcp_loss(q, yo, yi, b["M"], wo, wi)
    assert torch.allclose(got, ALPHA * bm.seg_loss(q, b["p_a"]))


def test_pretrain_without_copy_paste_feeds_the_first_labeled_crops_as_they_are():
    g = torch.Generator().manual_seed(0)
    lab, _, _ = samplers()
    lab.images = [torch.full_like(im, float(i)) for i, im in enumerate(lab.images)]  # case i: i
    on = bm.pretrain_batch(lab, cfg(), g)
    off = bm.pretrain_batch(lab, cfg(pretrain_mix=False), g)
    assert (off["M"] == 1).all() and (on["M"] == 0).any()
    for i in range(2):  # each image one case, whole: a single value
        assert off["x"][i].unique().numel() == 1


@pytest.mark.parametrize("shape", [(32, 32, 32), (64, 48, 32), (128, 128)])
@pytest.mark.parametrize("beta", [0.5, 2 / 3, 5 / 6])
def test_mask_shapes_hold_the_boxs_share_of_zeros(shape, beta):
    g = torch.Generator().manual_seed(1)
    box = bm.bcp_mask(shape, beta, generator=g)
    zeros = int((box == 0).sum())
    for _ in range(5):
        cubes = bm.bcp_mask(shape, beta, generator=g, shape="cubes")
        cube = 1
        for s in shape:
            cube *= max(s // 8, 1)
        assert zeros <= int((cubes == 0).sum()) < zeros + cube  # stops once it covers the box's
        slab = bm.bcp_mask(shape, beta, generator=g, shape="slab")
        zero_idx = torch.nonzero(slab == 0)
        spans = [int(zero_idx[:, ax].max() - zero_idx[:, ax].min() + 1) for ax in range(len(shape))]
        partial = [ax for ax, s in enumerate(spans) if s < shape[ax]]
        assert len(partial) == 1  # every axis but one spanned whole
        ax = partial[0]
        assert spans[ax] == max(round(shape[ax] * zeros / box.numel()), 1)
        assert int((slab == 0).sum()) == spans[ax] * box.numel() // shape[ax]


def test_cubes_are_small_cubes_at_random_places():
    g = torch.Generator().manual_seed(0)
    a, b = (bm.bcp_mask((32, 32, 32), generator=g, shape="cubes") for _ in range(2))
    assert not torch.equal(a, b)
    # the zeros are a union of 4-cubes (32 // 8): opening them with a 4-cube changes nothing
    z = (a == 0).float()[None, None]
    eroded = -torch.nn.functional.max_pool3d(-z, 4, 1)  # 1 where a whole 4-cube is zero
    opened = torch.nn.functional.max_pool3d(torch.nn.functional.pad(eroded, (3,) * 6), 4, 1)
    assert torch.equal(opened, z)


def test_default_flags_are_the_paper():
    c = bm.make_config("sample")
    assert (c.direction, c.pretrain_mix, c.mask_shape) == ("both", True, "box")
    assert bm.DIRECTIONS["both"] == (("x_a", "u_a"), ("u_b", "x_b"))


def test_ablation_flags_reach_the_command_line(capsys):
    with pytest.raises(SystemExit):
        bm.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--direction", "--pretrain-mix", "--mask-shape"):
        assert flag in out
