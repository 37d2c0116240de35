"""Every equation of BCP against a hand computation on tiny tensors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcp_minimal as bm
import get_data as gd


# ---------------------------------------------------------------- mask
@pytest.mark.parametrize("shape", [(112, 112, 80), (64, 64, 48), (30, 17, 9), (12, 20)])
def test_mask_box_size_and_values(shape):
    g = torch.Generator().manual_seed(0)
    M = bm.bcp_mask(shape, beta=2 / 3, generator=g)
    assert M.shape == shape and M.dtype == torch.float32
    assert set(M.unique().tolist()) <= {0.0, 1.0}
    zeros = (M == 0).nonzero()
    sizes = [int(s * 2 / 3) for s in shape]
    assert len(zeros) == np.prod(sizes)
    # the zeros form one axis-aligned box of int(s*beta) per axis
    assert (zeros.max(0).values - zeros.min(0).values + 1).tolist() == sizes


def test_mask_centered_and_random_placement():
    M = bm.bcp_mask((9, 12, 6), beta=1 / 3, center=True)
    box = (M == 0).nonzero()
    assert box.min(0).values.tolist() == [3, 4, 2] and box.max(0).values.tolist() == [5, 7, 3]
    corners = {tuple((bm.bcp_mask((40, 40, 40), generator=torch.Generator().manual_seed(s)) == 0)
                     .nonzero().min(0).values.tolist()) for s in range(20)}
    assert len(corners) > 5  # random places
    for c in corners:  # box inside the volume: corner in [0, s - int(s*beta)) as official
        assert all(0 <= v < 40 - 26 for v in c)
    a = bm.bcp_mask((40, 40, 40), generator=torch.Generator().manual_seed(3))
    b = bm.bcp_mask((40, 40, 40), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # reproducible from the generator


def test_mask_corner_range_is_the_official_one():
    # official np.random.randint(0, s - size): the last position s - size is never drawn
    seen = {int((bm.bcp_mask((4,), 0.5, generator=torch.Generator().manual_seed(s)) == 0).nonzero()[0])
            for s in range(60)}
    assert seen == {0, 1}


# ---------------------------------------------------------------- mix
def test_mix_hand_values_and_extremes():
    a = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    b = -torch.arange(8.0).reshape(1, 1, 2, 2, 2) - 1
    M = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])
    out = bm.mix(a, b, M)
    expected = torch.tensor([[[0.0, -2.0], [2.0, 3.0]], [[-5.0, -6.0], [6.0, 7.0]]])
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(bm.mix(a, b, torch.ones(2, 2, 2)), a)
    assert torch.equal(bm.mix(a, b, torch.zeros(2, 2, 2)), b)


def test_mix_labels_stay_integer():
    ya = torch.ones(2, 4, 4, 4, dtype=torch.long)
    yb = torch.full((2, 4, 4, 4), 2, dtype=torch.long)
    M = bm.bcp_mask((4, 4, 4), 0.5, center=True)
    y = bm.mix(ya, yb, M)
    assert y.dtype == torch.long
    assert (y[:, 1:3, 1:3, 1:3] == 2).all() and y.sum() == 2 * (64 - 8) + 2 * 2 * 8


def test_contract_mixes():
    """x_in = mix(x_a, u_a, M): labeled outside the box; x_out = mix(u_b, x_b, M): labeled inside."""
    M = bm.bcp_mask((8, 8, 8), center=True)
    x, u = torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8)
    x_in, x_out = bm.mix(x, u, M), bm.mix(u, x, M)
    assert torch.equal(x_in[0, 0] == 1, M == 0)  # unlabeled voxels exactly in the box
    assert torch.equal(x_out[0, 0] == 0, M == 0)  # labeled voxels exactly in the box


# ---------------------------------------------------------------- losses
def _hand_dice(logits, target, region, eps=bm.EPS):
    p = torch.softmax(logits.double(), 1).numpy()
    K = p.shape[1]
    vals = []
    for b in range(p.shape[0]):
        r = region.double().numpy().reshape(-1) if region.dim() == target.dim() - 1 else region[b].double().numpy().reshape(-1)
        for k in range(K):
            pk = p[b, k].reshape(-1)
            yk = (target[b].numpy().reshape(-1) == k).astype(float)
            vals.append((2 * np.sum(r * pk * yk) + eps) / (np.sum(r * (pk + yk)) + eps))
    return 1 - np.mean(vals)


def test_masked_dice_tiny_hand_computed():
    # 1 sample, 2 classes, 2 voxels, region = first voxel only
    logits = torch.tensor([[[[0.0, 5.0]], [[np.log(3.0), 0.0]]]])  # (1, 2, 1, 2): p1 = 0.75 at voxel 0
    target = torch.tensor([[[1, 0]]])
    region = torch.tensor([[1.0, 0.0]])
    # voxel 0: p = (0.25, 0.75), y = (0, 1). class0: (0+e)/(0.25+e); class1: (1.5+e)/(1.75+e)
    e = bm.EPS
    expected = 1 - 0.5 * ((0 + e) / (0.25 + e) + (1.5 + e) / (1.75 + e))
    got = bm.masked_dice_loss(logits, target, region)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_masked_dice_random_vs_formula_and_region_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 5, 4, 6, generator=g)
    target = torch.randint(0, 3, (3, 5, 4, 6), generator=g)
    region = (torch.rand(5, 4, 6, generator=g) > 0.4).float()
    got = bm.masked_dice_loss(logits, target, region).item()
    assert got == pytest.approx(_hand_dice(logits, target, region), rel=1e-5)
    # outside the region nothing matters
    logits2 = logits.clone()
    logits2[:, :, region == 0] = torch.randn_like(logits2[:, :, region == 0]) * 10
    target2 = target.clone()
    target2[:, region == 0] = 0
    assert bm.masked_dice_loss(logits2, target2, region).item() == pytest.approx(got, rel=1e-6)
    # not the whole-image Dice
    assert abs(bm.masked_dice_loss(logits, target, torch.ones_like(region)).item() - got) > 1e-3


def test_masked_dice_counts_background():
    # perfect foreground, wrong background inside the region -> the loss must see it
    logits = torch.tensor([[[[10.0, 10.0]], [[-10.0, -10.0]]]])  # predicts class 0 everywhere
    target = torch.tensor([[[0, 1]]])
    assert bm.masked_dice_loss(logits, target, torch.tensor([[1.0, 0.0]])).item() < 1e-3
    assert bm.masked_dice_loss(logits, target, torch.tensor([[0.0, 1.0]])).item() > 0.9


def test_masked_ce_is_mean_over_region():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, 4, generator=g)
    target = torch.randint(0, 2, (2, 4, 4, 4), generator=g)
    region = torch.zeros(4, 4, 4)
    region[1:3] = 1
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = ce[:, 1:3].mean()
    assert bm.masked_ce(logits, target, region).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bcp_loss_formula():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 6, 6, 6, generator=g)
    y_o = torch.randint(0, 2, (2, 6, 6, 6), generator=g)
    y_i = torch.randint(0, 2, (2, 6, 6, 6), generator=g)
    M = bm.bcp_mask((6, 6, 6), 0.5, generator=g)
    wo, wi = 1.0, 0.5
    expected = (wo * _hand_dice(q, y_o, M) + wi * _hand_dice(q, y_i, 1 - M)
                + wo * F.cross_entropy(q, y_o, reduction="none")[:, M == 1].mean().item()
                + wi * F.cross_entropy(q, y_i, reduction="none")[:, M == 0].mean().item()) / 2
    assert bm.bcp_loss(q, y_o, y_i, M, wo, wi).item() == pytest.approx(expected, rel=1e-5)


def test_bcp_loss_pseudo_label_never_supervises_ground_truth_region():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 6, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (1, 6, 6, 6), generator=g)
    p = torch.randint(0, 2, (1, 6, 6, 6), generator=g)
    M = bm.bcp_mask((6, 6, 6), 0.5, center=True)
    loss = bm.bcp_loss(q, y, p, M, 1.0, 0.5)
    p2 = p.clone()
    p2[:, M == 1] = 1 - p2[:, M == 1]  # change the pseudo-label outside its own region
    assert bm.bcp_loss(q, y, p2, M, 1.0, 0.5).item() == pytest.approx(loss.item(), rel=1e-7)
    # weights: alpha only scales the pseudo-labeled terms
    l0 = bm.bcp_loss(q, y, p, M, 1.0, 0.0).item()
    l1 = bm.bcp_loss(q, y, p, M, 1.0, 1.0).item()
    assert loss.item() == pytest.approx(l0 + 0.5 * (l1 - l0), rel=1e-6)


# ---------------------------------------------------------------- teacher
def test_ema_update_hand_values():
    torch.manual_seed(0)
    s, t = bm.UNet(width=2), bm.UNet(width=2)
    s.train()(torch.randn(2, 1, 16, 16, 16))  # move the student's BN buffers
    t0 = {k: v.clone() for k, v in t.state_dict().items()}
    bm.ema_update(t, s, 0.9)
    for k, v in t.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * s.state_dict()[k])
        else:
            assert torch.equal(v, s.state_dict()[k])
    bm.ema_update(t, s, 0.0)  # decay 0 = copy
    for a, b in zip(t.parameters(), s.parameters()):
        assert torch.equal(a, b)


def _blobs(seed, shape=(2, 20, 20, 12)):
    """Random masks of ~100 components each, the largest rarely the first one scipy labels
    (at density 0.28 they formed one big component, so 'largest' and 'first' looked alike)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.9)


def test_largest_component_hand_case_and_26_connectivity():
    m = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    m[0, 0, 0, 0] = m[0, 1, 1, 1] = True  # diagonal neighbours: one 26-connected component
    m[0, 4:6, 4:6, 4] = True  # a separate component of 4 voxels
    out = bm.largest_component(m)
    assert out.sum() == 4 and out[0, 4:6, 4:6, 4].all()
    m[0, 2, 2, 2] = m[0, 3, 3, 3] = True  # the diagonal chain now joins -> 8 voxels
    assert bm.largest_component(m).sum() == 8
    assert not bm.largest_component(torch.zeros(1, 4, 4, 4, dtype=torch.bool)).any()


@pytest.mark.parametrize("seed", range(4))
def test_largest_component_is_one_whole_largest_component(seed):
    from scipy import ndimage

    m, firsts = _blobs(seed), []
    for out in [bm.largest_component(m)]:
        for b in range(m.shape[0]):
            lab, n = ndimage.label(m[b].numpy(), np.ones((3, 3, 3)))
            sizes = np.bincount(lab.ravel())[1:]
            ids = np.unique(lab[out[b].numpy()])
            # exactly one whole component of the input, and one of the largest
            assert len(ids) == 1 and ids[0] > 0 and n > 10
            assert out[b].sum() == sizes[ids[0] - 1] == sizes.max()
            firsts.append(ids[0] == 1)
    assert not all(firsts)  # the data can tell "largest" from "first"


def test_pseudo_label_argmax_lcc_and_multiclass():
    logits = torch.zeros(1, 3, 8, 8, 8)
    logits[0, 1, 0:3, 0:3, 0:3] = 5  # class 1: big blob (27)
    logits[0, 1, 6, 6, 6] = 5  # class 1: stray voxel
    logits[0, 2, 5:7, 0:2, 0:2] = 5  # class 2: blob (8)
    logits[0, 2, 0, 7, 7] = 5  # class 2: stray voxel
    raw = bm.pseudo_label(logits, largest_cc=False)
    assert raw.dtype == torch.long and (raw == 1).sum() == 28 and (raw == 2).sum() == 9
    lab = bm.pseudo_label(logits)
    assert (lab == 1).sum() == 27 and (lab == 2).sum() == 8 and lab[0, 6, 6, 6] == 0 and lab[0, 0, 7, 7] == 0
    # two classes: argmax == official softmax[1] >= 0.5
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 2, 8, 8, 8, generator=g)
    assert torch.equal(bm.pseudo_label(lg, False), (lg.softmax(1)[:, 1] >= 0.5).long())


# ---------------------------------------------------------------- network
@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 48), (64, 32, 16)])
def test_unet_3d_shapes(shape):
    net = bm.UNet(1, 3, width=2).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, *shape)).shape == (2, 3, *shape)


def test_unet_2d_and_size_rule():
    net = bm.UNet(2, 4, width=2, dims=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 48, 32)).shape == (1, 4, 48, 32)
    with pytest.raises(ValueError, match="divide by 16"):
        bm.UNet(width=2)(torch.randn(1, 1, 24, 16, 16))


@pytest.mark.parametrize("dims", [3, 2])
def test_top_convs_1_keeps_one_convolution_in_each_full_resolution_block(dims):
    """--top-convs 1: enc0 (1 -> w) and dec0 (2w -> w) hold one conv -> BatchNorm -> ReLU each,
    as the V-Net's top level; every other block keeps two. The network is the full U-Net less
    exactly two w -> w convolutions (w * w * 3^d weights) and their BatchNorms (2w each); the
    default's key names are unchanged, so its checkpoints load."""
    w, k = 4, 3**dims
    full, lite = bm.UNet(1, 2, w, dims), bm.UNet(1, 2, w, dims, top_convs=1)
    blocks = ["enc0", "enc1", "enc2", "enc3", "enc4", "dec3", "dec2", "dec1", "dec0"]
    convs = [[(c.in_channels, c.out_channels) for c in getattr(lite, b).modules()
              if isinstance(c, (torch.nn.Conv2d, torch.nn.Conv3d))] for b in blocks]
    assert convs[0] == [(1, w)] and convs[-1] == [(2 * w, w)] and all(len(c) == 2 for c in convs[1:-1])
    assert [type(m).__name__ for m in lite.enc0] == [f"Conv{dims}d", f"BatchNorm{dims}d", "ReLU"]
    size = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert size(full) - size(lite) == 2 * (w * w * k + 2 * w)
    assert list(full.state_dict())[:7] == [f"enc0.{i}.{n}" for i, n in [
        (0, "weight"), (1, "weight"), (1, "bias"), (1, "running_mean"), (1, "running_var"),
        (1, "num_batches_tracked"), (3, "weight")]]
    with torch.no_grad():
        assert lite.eval()(torch.randn(2, 1, *[32] * dims)).shape == (2, 2, *[32] * dims)
    net = bm.make_model(bm.make_config("sample", top_convs=1))  # the flag reaches the network
    assert len(net.enc0) == len(net.dec0) == 3 and len(net.enc1) == 6
    with pytest.raises(gd.UserError, match=r"--top-convs 3: one of \[1, 2\]"):  # the API too, not just argparse
        bm.check_config(bm.make_config("sample", top_convs=3))


@pytest.mark.parametrize("dims", [3, 2])
def test_skip_add_feeds_each_decoder_block_the_sum_of_encoder_and_upsampled_features(dims):
    """--skip add: each decoder block's input is x_i + up(u_{i+1}), c_i channels (the V-Net's
    additive skips), not their concatenation (2 c_i): its first convolution is c_i -> c_i,
    c_i * c_i * 3^d weights fewer per level (w, 2w, 4w, 8w); parameter names unchanged."""
    w, k = 4, 3**dims
    torch.manual_seed(0)
    cat, add = bm.UNet(1, 2, w, dims).eval(), bm.UNet(1, 2, w, dims, skip="add").eval()
    seen = {}
    names = ["enc0", "enc1", "enc2", "enc3", "up4", "up3", "up2", "up1", "dec3", "dec2", "dec1", "dec0"]
    for name in names:
        getattr(add, name).register_forward_hook(
            lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
    x = torch.randn(2, 1, *[16] * dims)
    with torch.no_grad():
        y = add(x)
    for i in range(4):  # dec_i gets enc_i's output + up_{i+1}'s: (2, w * 2^i, *S / 2^i)
        assert torch.equal(seen[f"dec{i}"][0], seen[f"enc{i}"][1] + seen[f"up{i + 1}"][1])
        assert seen[f"dec{i}"][0].shape == (2, w * 2**i, *[16 // 2**i] * dims)
        assert (getattr(add, f"dec{i}")[0].in_channels, getattr(cat, f"dec{i}")[0].in_channels) == (
            w * 2**i, 2 * w * 2**i)
    assert y.shape == (2, 2, *[16] * dims)
    size = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert size(cat) - size(add) == sum((w * 2**i) ** 2 * k for i in range(4))
    assert [n for n, _ in cat.named_parameters()] == [n for n, _ in add.named_parameters()]
    net = bm.make_model(bm.make_config("sample", top_convs=1, skip="add"))  # flags reach it
    assert net.add and len(net.dec0) == 3 and net.dec0[0].in_channels == net.enc0[0].out_channels
    assert not bm.make_model(bm.make_config("sample")).add  # default: the U-Net's concatenation
    with pytest.raises(gd.UserError, match=r"--skip sum: one of \[.concat., .add.\]"):
        bm.check_config(bm.make_config("sample", skip="sum"))


@pytest.mark.parametrize("dims", [3, 2])
def test_dropout_zeroes_whole_channels_of_bottleneck_and_last_features_in_train_only(dims):
    """--dropout p: as the official V-Net's Dropout3d(0.5), whole channels of the bottleneck
    and of the head's input are zeroed (the rest scaled 1 / (1 - p)) in train mode; eval mode
    is the same network without dropout."""
    torch.manual_seed(0)
    net, plain = bm.UNet(1, 2, 4, dims, dropout=0.5), bm.UNet(1, 2, 4, dims)
    seen = {}
    for name in ("up4", "head"):
        getattr(net, name).register_forward_hook(lambda m, i, o, n=name: seen.update({n: i[0]}))
    x = torch.randn(6, 1, *[32] * dims)
    net.train()(x)
    for name, c in (("up4", 64), ("head", 4)):
        zero = seen[name].flatten(2).abs().amax(2) == 0  # (B, C): channels all zero
        assert seen[name].shape[1] == c and 0.2 < zero.float().mean() < 0.8, name
    plain.load_state_dict(net.state_dict())  # the BatchNorm statistics of that forward
    with torch.no_grad():
        assert torch.equal(net.eval()(x), plain.eval()(x))
    plain.head.register_forward_hook(lambda m, i, o: seen.update({"plain": i[0]}))
    plain.train()(x)  # the default, dropout 0: no channel is zeroed
    assert (seen["plain"].flatten(2).abs().amax(2) > 0).all()


# ---------------------------------------------------------------- sliding window
class _WindowMean(torch.nn.Module):
    """Not pointwise: every voxel of a window gets logits (m, -m), m = the window's mean."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # a parameter tells the device

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3, 4), keepdim=True).expand_as(x)
        return torch.cat([m, -m], 1)


def _official_windows(S, p, st):
    """The official test_single_case window loop, written out independently."""
    n = [int(np.ceil((s - q) / t)) + 1 for s, q, t in zip(S, p, st)]
    return [(min(t * i, s - q) for i, s, q, t in zip(idx, S, p, st)) for idx in np.ndindex(*n)]


@pytest.mark.parametrize("shape,stride", [((20, 18, 16), (3, 2, 5)), ((50, 16, 20), (12, 18, 4)),
                                          ((33, 21, 17), (5, 7, 1))])
def test_sliding_window_averages_windows_at_official_positions(shape, stride):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, *shape, generator=g)
    patch = (16, 16, 16)
    probs = bm.sliding_window_predict(_WindowMean(), image, patch, stride, batch=3)
    total, count = torch.zeros(2, *shape), torch.zeros(shape)
    for a, b, c in (tuple(w) for w in _official_windows(shape, patch, stride)):
        m = image[0, a:a + 16, b:b + 16, c:c + 16].mean()
        total[:, a:a + 16, b:b + 16, c:c + 16] += torch.stack([m, -m]).softmax(0)[:, None, None, None]
        count[a:a + 16, b:b + 16, c:c + 16] += 1
    torch.testing.assert_close(probs, total / count)


def test_sliding_window_pads_small_volumes():
    image = torch.randn(1, 8, 10, 12)
    probs = bm.sliding_window_predict(_WindowMean(), image, (16, 16, 16), (4, 4, 4))
    padded = torch.nn.functional.pad(image, (2, 2, 3, 3, 4, 4))  # centred zero padding to 16^3
    m = padded.mean()
    torch.testing.assert_close(probs, torch.stack([m, -m]).softmax(0)[:, None, None, None].expand(2, 8, 10, 12))


def test_bundled_samples_are_what_the_seeded_generator_makes(tmp_path):
    import h5py
    from conftest import ROOT
    from make_samples import make_sample_data

    fresh = make_sample_data(tmp_path / "s")
    for name in ("train.list", "test.list", "val.list"):
        assert (fresh / name).read_text() == (ROOT / "data_samples" / name).read_text()
    for case in ["PHANTOM000", "PHANTOM019", "PHANTOM023"]:
        for key in ("image", "label"):
            with h5py.File(fresh / gd.CASES_DIR / case / gd.CASE_FILE) as a, \
                    h5py.File(ROOT / "data_samples" / gd.CASES_DIR / case / gd.CASE_FILE) as b:
                np.testing.assert_array_equal(a[key][()], b[key][()])


# ---------------------------------------------------------------- learning rate
def test_stage_lr_is_the_official_schedule():
    cfg = bm.make_config("LA")  # 0.01, x0.1 every 2 500 self-training iterations
    assert bm.stage_lr(cfg, "selftrain", 1) == pytest.approx(0.01)
    assert bm.stage_lr(cfg, "selftrain", 2500) == pytest.approx(0.01)
    assert bm.stage_lr(cfg, "selftrain", 2501) == pytest.approx(0.001)
    assert bm.stage_lr(cfg, "selftrain", 5001) == pytest.approx(0.0001)
    assert bm.stage_lr(cfg, "pretrain", 5001) == pytest.approx(0.01)  # official pre-training never decays


def test_la_half_preset_decays_the_lr_for_the_last_400_self_training_iterations():
    cfg = bm.make_config("LA_half")  # README, Speed: x0.1 after 2 000 of its 2 400
    lrs = [bm.stage_lr(cfg, "selftrain", it) for it in range(1, cfg.selftrain_iters + 1)]
    assert lrs[:2000] == pytest.approx([0.01] * 2000)
    assert lrs[2000:] == pytest.approx([0.001] * 400)
    assert bm.stage_lr(cfg, "pretrain", cfg.pretrain_iters) == pytest.approx(0.01)


def test_largest_component_in_2d_is_8_connected():
    """ACDC slices: diagonal pixels are neighbours (8-connectivity), as official skimage."""
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = True  # a diagonal chain of 3: one component in 8-conn
    m[0, 4, 4] = m[0, 4, 5] = True  # 2 pixels apart from it
    out = bm.largest_component(m)
    assert out.sum() == 3 and out[0, 1, 1] and not out[0, 4, 4]


def test_sampler_draws_every_case_once_per_pass():
    g = torch.Generator().manual_seed(0)
    s = gd.VolumeSampler([np.zeros((16, 16, 16), np.float32)] * 5, None, (16, 16, 16), "cpu", g)
    first, second = s.draw(5), s.draw(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    third = s.draw(3) + s.draw(2)  # a pass split over two calls is still one pass
    assert sorted(third) == list(range(5))
