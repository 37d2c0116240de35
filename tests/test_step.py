"""One BCP iteration, end to end on tensors whose values say where they came from: which image
lands where in X_in / X_out, which labels and weights the loss reads, what the teacher sees."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcp_minimal as bm
import get_data as gd

P = (16, 16, 16)


class Const(torch.nn.Module):
    """A fake teacher: records its inputs, predicts class `k` everywhere."""

    def __init__(self, k=0, K=2):
        super().__init__()
        self.k, self.K, self.seen = k, K, []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append(x.clone())
        return F.one_hot(torch.full((x.shape[0], *x.shape[2:]), self.k), self.K).movedim(-1, 1).float() * 5


def samplers(lab_value=1.0, unl_value=-1.0, lab_label=1, unl_label=1, n=3, seed=0):
    """Labeled volumes filled with lab_value (label lab_label), unlabeled with unl_value."""
    g = torch.Generator().manual_seed(seed)
    shape = (20, 20, 18)
    lab = gd.VolumeSampler([np.full(shape, lab_value, np.float32)] * n,
                           [np.full(shape, lab_label, np.uint8)] * n, P, "cpu", g)
    unl = gd.VolumeSampler([np.full(shape, unl_value, np.float32)] * n,
                           [np.full(shape, unl_label, np.uint8)] * n, P, "cpu", g)
    return lab, unl, g


def cfg(**kw):
    return bm.make_config("sample", patch=P, batch_size=8, **kw)


def test_selftrain_batch_puts_each_image_and_label_where_the_paper_says():
    lab, unl, g = samplers()
    teacher = Const(k=0)  # pseudo-label 0 everywhere; ground truth is 1 everywhere
    b = bm.selftrain_batch(lab, unl, teacher, cfg(), g)
    M = b["M"]
    assert b["x_in"].shape == (2, 1, *P) and b["y_in"].shape == (2, *P)
    # X_in = X_l M + X_u (1 - M): labeled (+1) outside the box, unlabeled (-1) inside
    assert torch.equal(b["x_in"][:, 0], (2 * M - 1).expand(2, *P))
    # X_out = X_u M + X_l (1 - M): unlabeled outside, labeled inside
    assert torch.equal(b["x_out"][:, 0], (1 - 2 * M).expand(2, *P))
    # labels the same way: ground truth (1) where the labeled image shows, pseudo-label (0) elsewhere
    assert torch.equal(b["y_in"], M.long().expand(2, *P)) and torch.equal(b["y_out"], (1 - M).long().expand(2, *P))
    assert (b["y_a"] == 1).all() and (b["y_b"] == 1).all() and (b["p_a"] == 0).all() and (b["p_b"] == 0).all()


def test_teacher_sees_only_unlabeled_images_each_half_alone():
    lab, unl, g = samplers()
    teacher = Const()
    bm.selftrain_batch(lab, unl, teacher, cfg(), g)
    assert [x.shape[0] for x in teacher.seen] == [2, 2]  # official: two forwards of 2
    assert all((x == -1).all() for x in teacher.seen)  # never a labeled voxel
    assert teacher.training  # official: a train-mode teacher


def test_unlabeled_ground_truth_never_reaches_the_loss():
    losses = []
    for unl_label in (0, 1):
        lab, unl, g = samplers(unl_label=unl_label)
        torch.manual_seed(0)
        student = bm.UNet(width=2)
        loss, _ = bm.stage_loss("selftrain", student, Const(k=0), lab, unl, cfg(), g)
        losses.append(loss.item())
    assert losses[0] == losses[1]


def test_selftrain_loss_is_the_paper_sum_with_1_and_alpha_in_the_right_places(monkeypatch):
    lab, unl, g = samplers()
    kept = {}
    real = bm.selftrain_batch
    monkeypatch.setattr(bm, "selftrain_batch", lambda *a: kept.setdefault("b", real(*a)))
    torch.manual_seed(0)
    student = bm.UNet(width=2)
    alpha = 0.3
    loss, terms = bm.stage_loss("selftrain", student, Const(k=0), lab, unl, cfg(alpha=alpha), g)
    b, M = kept["b"], kept["b"]["M"]
    student.train()
    torch.manual_seed(0)
    q_in, q_out = student(b["x_in"]), student(b["x_out"])

    def region_loss(q, y, r):  # (CE mean over r + per-sample per-class Dice over r) / 2, by hand
        p = q.softmax(1)
        oh = F.one_hot(y, 2).movedim(-1, 1).float()
        dice = 1 - ((2 * (r * p * oh).sum((2, 3, 4)) + bm.EPS) / ((r * (p + oh)).sum((2, 3, 4)) + bm.EPS)).mean()
        ce = (F.cross_entropy(q, y, reduction="none") * r).sum() / r.sum()
        return dice, ce

    # ground truth counts 1 and pseudo-labels alpha: y_in's GT is outside the box (M), y_out's inside
    parts = [(q_in, b["y_in"], M, 1.0), (q_in, b["y_in"], 1 - M, alpha),
             (q_out, b["y_out"], M, alpha), (q_out, b["y_out"], 1 - M, 1.0)]
    expected = sum(w * sum(region_loss(q, y, r.expand_as(y).float())) for q, y, r, w in parts) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected_in = sum(w * sum(region_loss(q, y, r.expand_as(y).float())) for q, y, r, w in parts[:2]) / 2
    assert terms["loss_in"].item() == pytest.approx(expected_in.item(), rel=1e-5)  # L_in alone, by hand


def test_pretrain_batch_mixes_images_and_labels_with_one_mask():
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    labels = [(rng.random((20, 20, 18)) > 0.5).astype(np.uint8) for _ in range(4)]
    images = [lb.astype(np.float32) * 2 + i * 10 for i, lb in enumerate(labels)]  # image says its label and case
    lab = gd.VolumeSampler(images, labels, P, "cpu", g)
    b = bm.pretrain_batch(lab, cfg(), g)
    assert torch.equal((b["x"][:, 0] % 10) / 2, b["y"].float())  # the same mask for both
    case = (b["x"][:, 0] // 10)  # which case each voxel came from
    assert (case[:, b["M"] == 0] != case[:, b["M"] == 1][:, :1]).all()  # box from the other image


@pytest.mark.parametrize("patch", [(16, 32, 16), (32, 16, 48)])
def test_sampler_rotates_image_and_label_together_for_non_cubic_patches(patch):
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(1)
    image = rng.random((40, 30, 50)).astype(np.float32)
    label = (image > 0.6).astype(np.uint8)
    s = gd.VolumeSampler([image], [label], patch, "cpu", g)
    for _ in range(24):
        x, y = s.batch([0])
        assert x.shape == (1, 1, *patch) and y.shape == (1, *patch)
        assert torch.equal(y[0], (x[0, 0] > 0.6).long())  # the label moved with its image
    # every crop is a rotated/flipped piece of the (zero-padded) volume
    vals = x[0, 0].numpy().ravel()
    assert np.isin(vals[vals != 0], image.ravel()).all()


def test_sampler_draws_every_rotation():
    g = torch.Generator().manual_seed(3)
    image = np.arange(32 * 32 * 16, dtype=np.float32).reshape(32, 32, 16)
    s = gd.VolumeSampler([image], [np.zeros_like(image, np.uint8)], (32, 32, 16), "cpu", g,
                         margin=0)  # no padding: one crop, only the rotation and flip vary
    seen = {tuple(s.batch([0])[0][0, 0, :2, :2, 0].flatten().tolist()) for _ in range(60)}
    # official RandomRotFlip always flips after rotating: the 4 reflections of the square, never
    # the identity
    assert len(seen) == 4 and (0.0, 16.0, 512.0, 528.0) not in seen


def test_sampler_pads_as_the_official_random_crop():
    # official RandomCrop: a side <= the patch's -> every side gets max((patch - s) // 2 + 3, 0)
    # zeros at both ends. Patch (32, 32, 48), x/y padded to 32 (rotation), volume (40, 30, 44):
    # x: max(-4 + 3, 0) = 0, y: 1 + 3 = 4, z: 2 + 3 = 5  ->  (40, 38, 54)
    g = torch.Generator().manual_seed(4)
    image = np.ones((40, 30, 44), np.float32)
    s = gd.VolumeSampler([image], [image.astype(np.uint8)], (32, 32, 48), "cpu", g)
    assert s.images[0].shape == (40, 38, 54) and s.labels[0].shape == (40, 38, 54)
    assert gd.VolumeSampler([image], [image.astype(np.uint8)], (32, 32, 48), "cpu", g,
                            margin=0).images[0].shape == (40, 32, 48)  # just enough
    # the 44 slices (at 5 .. 48 of 54) move in the 48 of the crop: its corner c = 0 .. 6 puts
    # the first one at max(5 - c, 0) = 5 .. 0
    firsts = set()
    for _ in range(200):
        x, y = s.batch([0])
        z = torch.nonzero(x[0, 0].sum((0, 1)))[:, 0]
        firsts.add(int(z.min()))
        assert torch.equal(y[0].float(), x[0, 0])
    assert firsts == {0, 1, 2, 3, 4, 5}
    big = np.ones((80, 80, 60), np.float32)  # no side <= the patch: no padding (official)
    assert gd.VolumeSampler([big], [big.astype(np.uint8)], (32, 32, 48), "cpu",
                            g).images[0].shape == (80, 80, 60)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (31, 31)])
def test_rotate_nearest_is_scipys_order_0_rotation(shape):
    from scipy import ndimage
    v = torch.from_numpy(np.random.default_rng(5).random(shape).astype(np.float32) + 0.1)
    for angle in (15, -20, 7, 33, 90):
        ref = ndimage.rotate(v.numpy(), angle, order=0, reshape=False)
        got = gd.rotate_nearest(v, angle).numpy()
        # noise: every pixel is its own rounding decision. Compared where the source lies 2
        # pixels inside the image (scipy's border mode differs next to the zeros)
        inside = ndimage.binary_erosion(ref > 0, iterations=2, border_value=0)
        assert inside.mean() > 0.4 and np.array_equal(got[inside], ref[inside]), angle
    if shape[0] == shape[1]:
        assert torch.equal(gd.rotate_nearest(v, 90), torch.rot90(v, 1, (0, 1)))
    stack = torch.stack([v, 2 * v], -1)  # (X, Y, 2): every channel turned alike
    assert torch.equal(gd.rotate_nearest(stack, 15)[..., 1], gd.rotate_nearest(2 * v, 15))


def test_acdc_augmentation_draws_as_the_official_random_generator():
    # official ACDC RandomGenerator: rot90 + flip half the time, else a rotation by an integer
    # angle in [-20, 20) half the time, else the slice as it is
    g = torch.Generator().manual_seed(6)
    image = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    s = gd.VolumeSampler([image], [np.zeros_like(image, np.uint8)], (32, 32), "cpu", g, rotate=20)
    poses = [s.pose() for _ in range(4000)]
    turned = [p for p in poses if p[1] is not None]
    angles = [p[2] for p in poses if p[1] is None and p[2]]
    same = sum(p == (0, None, 0) for p in poses)
    assert abs(len(turned) / 4000 - 0.5) < 0.03 and abs(same / 4000 - 0.25) < 0.03
    assert set(angles) <= set(range(-20, 20)) - {0} and len(set(angles)) == 39  # 0: "as is"
    assert all(p[2] == 0 and p[0] in range(4) for p in turned)
    x, y = s.batch([0])  # image and label turned together, the patch's shape kept
    assert x.shape == (1, 1, 32, 32) and y.shape == (1, 32, 32)
    # LA (rotate=0): the draws of before, a turn and a flip every time
    g0, g1 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s0 = gd.VolumeSampler([image], None, (32, 32), "cpu", g0)
    assert [s0.pose() for _ in range(20)] == [
        (int(torch.randint(0, 4, (1,), generator=g1)), int(torch.randint(0, 2, (1,), generator=g1)),
         0) for _ in range(20)]
