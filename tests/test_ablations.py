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
    assert (M == 0).any() and (M == 1).any()  # the box is drawn in every variant
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


# direction -> per mix (outer crop, inner crop), by hand from the paper's Table 4: x labeled,
# u unlabeled, a / b the first / second half of the batch
CROPS = {"both": (("x_a", "u_a"), ("u_b", "x_b")), "in": (("x_a", "u_a"), ("x_b", "u_b")),
         "out": (("u_a", "x_a"), ("u_b", "x_b")), "within": (("x_a", "x_b"), ("u_a", "u_b")),
         "none": (("x_a", "x_a"), ("u_a", "u_a"))}


class ByValue(torch.nn.Module):
    """A fake teacher whose pseudo-label is -(image value): crop u_i (value -i) -> class i."""

    def forward(self, u):
        return torch.nn.functional.one_hot((-u[:, 0]).long(), 6).movedim(-1, 1).float()


@pytest.mark.parametrize("direction", list(CROPS))
def test_each_direction_pastes_the_very_crops_it_names(direction):
    """Every crop its own value (labeled 1..4 with label 1..4, unlabeled -1..-4 with
    pseudo-label 1..4): a mix that took the other half's crop, or swapped outer and inner
    within one kind, fails (the kind-level test above cannot see that)."""
    lab, unl, g = samplers()
    n = 4  # batch_size // 2 crops of each kind: halves a = 1, 2 and b = 3, 4
    lab.batch = lambda idx: (torch.arange(1.0, n + 1).view(n, 1, 1, 1, 1).expand(n, 1, *P),
                             torch.arange(1, n + 1).view(n, 1, 1, 1).expand(n, *P))
    unl.batch = lambda idx: (-torch.arange(1.0, n + 1).view(n, 1, 1, 1, 1).expand(n, 1, *P), None)
    b = bm.selftrain_batch(lab, unl, ByValue(), cfg(direction=direction, alpha=ALPHA,
                                                  pseudo_lcc=False), g)
    M = b["M"]
    value = {"x_a": (1.0, 2.0), "x_b": (3.0, 4.0), "u_a": (-1.0, -2.0), "u_b": (-3.0, -4.0)}
    for name, (outer, inner) in zip(("in", "out"), CROPS[direction]):
        for i in range(2):
            vo, vi = value[outer][i], value[inner][i]
            assert torch.equal(b[f"x_{name}"][i, 0], vo * M + vi * (1 - M)), (name, i)
            assert torch.equal(b[f"y_{name}"][i], (abs(vo) * M + abs(vi) * (1 - M)).long())
            yo, yi, wo, wi = b[f"targets_{name}"]
            assert (yo[i] == abs(vo)).all() and (yi[i] == abs(vi)).all(), (name, i)
            assert (wo, wi) == tuple(1.0 if c[0] == "x" else ALPHA for c in (outer, inner))


def test_no_copy_paste_pastes_each_crop_into_itself_with_the_same_weights():
    """--direction none: x_a and u_a whole (a crop mixed with itself is itself), their own
    targets in both regions, so the loss keeps BCP's form and total weight (1 + alpha per mix
    side, as in X_in / X_out): only the copy-paste is gone."""
    b = batch("none")
    assert torch.equal(b["y_in"], b["y_a"]) and torch.equal(b["y_out"], b["p_a"])
    yo, yi, wo, wi = b["targets_in"]
    assert yo is yi and (wo, wi) == (1.0, 1.0)
    yo, yi, wo, wi = b["targets_out"]
    assert yo is yi and (wo, wi) == (ALPHA, ALPHA)


def test_variants_see_the_same_crops_and_masks_as_bcp():
    """Paired draws: without copy-paste the box is still drawn, so every variant's crops (and
    its M) at each step are BCP's: only what is pasted where differs."""
    outs = {d: [] for d in ("both", "none", "within")}
    for d in outs:
        lab, unl, g = samplers()
        lab.images = [torch.full_like(im, float(i + 1)) for i, im in enumerate(lab.images)]
        for _ in range(3):
            outs[d].append(bm.selftrain_batch(lab, unl, Const(k=0), cfg(direction=d), g))
    for a, b in zip(outs["both"], outs["none"]):
        assert torch.equal(a["M"], b["M"]) and torch.equal(a["y_a"], b["y_a"])
        xa = a["x_in"][:, 0] * a["M"]  # the labeled crop outside the box, as BCP saw it
        assert torch.equal(xa, b["x_in"][:, 0] * a["M"])
    assert all(torch.equal(a["M"], c["M"]) for a, c in zip(outs["both"], outs["within"]))


def test_pretrain_without_copy_paste_feeds_the_first_labeled_crops_as_they_are():
    def stage1(**kw):  # the same cases, crops and mask draws for both
        lab, _, g = samplers()
        lab.images = [torch.full_like(im, float(i)) for i, im in enumerate(lab.images)]
        return bm.pretrain_batch(lab, cfg(**kw), g)
    on, off = stage1(), stage1(pretrain_mix=False)
    assert torch.equal(on["M"], off["M"])  # the same draws
    for i in range(2):  # each image one case, whole: a single value, the outer one of the mix
        assert off["x"][i].unique().numel() == 1
        assert torch.equal(off["x"][i] * on["M"], on["x"][i] * on["M"])


@pytest.mark.parametrize("shape", [(48, 48, 32), (64, 48, 32), (128, 128)])
@pytest.mark.parametrize("beta", [0.5, 2 / 3, 5 / 6])
def test_mask_shapes_as_the_official_random_and_contact_masks(shape, beta):
    g = torch.Generator().manual_seed(1)
    box = bm.bcp_mask(shape, beta, generator=g)
    share = int((box == 0).sum()) / box.numel()
    side = [max(int(s * beta / 3), 1) for s in shape]
    for _ in range(5):
        cubes = bm.bcp_mask(shape, beta, generator=g, shape="cubes")
        zeros = int((cubes == 0).sum())
        assert zeros == 3 ** len(shape) * torch.tensor(side).prod()  # one block per cell, apart
        for idx in torch.nonzero(cubes == 0):  # each zero inside its cell
            cellw = [s // 3 for s in shape]
            assert all(int(i) < 3 * c for i, c in zip(idx, cellw))
        slab = bm.bcp_mask(shape, beta, generator=g, shape="slab")
        axis = len(shape) - 1 if len(shape) == 3 else 0  # official LA: z; ACDC: the first axis
        zero_idx = torch.nonzero(slab == 0)
        spans = [int(zero_idx[:, a].max() - zero_idx[:, a].min() + 1) for a in range(len(shape))]
        assert spans == [int(s * share) if a == axis else s for a, s in enumerate(shape)]
        assert int((slab == 0).sum()) == spans[axis] * box.numel() // shape[axis]


def test_cubes_are_placed_at_random_in_their_cells():
    g = torch.Generator().manual_seed(0)
    a, b = (bm.bcp_mask((48, 48, 48), generator=g, shape="cubes") for _ in range(2))
    assert not torch.equal(a, b)
    # the zeros are 27 blocks of 10^3 (48 * 2/3 / 3 = 10.67 -> 10): opening them with a
    # 10-cube changes nothing
    z = (a == 0).float()[None, None]
    eroded = -torch.nn.functional.max_pool3d(-z, 10, 1)  # 1 where a whole 10-cube is zero
    opened = torch.nn.functional.max_pool3d(torch.nn.functional.pad(eroded, (9,) * 6), 10, 1)
    assert torch.equal(opened, z) and int(eroded.sum()) == 27


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
