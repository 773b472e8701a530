"""Per-image policies, erasing and mixing against per-image references (tiny batches, CPU)."""
import math
import pytest
import torch
import torch.nn.functional as F
import cifar_kit._tvcompat  # makes torchvision importable where its compiled operators cannot load
import torchvision.transforms.v2 as v2
from cifar_kit.data.policies import OPS, GEOMETRIC, RAND_OPS, STANDARD_SPACE, WIDE_SPACE, CIFAR10_POLICY, GEOMETRIC_BOUND, PolicyDraw, apply_policy, geometric, TrivialAugmentWide, RandAugment, AutoAugment, get_auto_augment, erasing_boxes, cutout_boxes, erase_boxes, RandomErasing, get_erasing, Mixup, mix_batch, mixup_target, cutmix_box, soft_target_cross_entropy

_tv = v2.TrivialAugmentWide()
def tv_op(img, name, m):
    return _tv._apply_image_or_video_transform(img, name, float(m), interpolation=_tv.interpolation, fill=_tv._fill)

def batch(n=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200
    x = base + torch.linspace(0, 55, size)[None, None, :, None] * torch.rand(n, 1, 1, 1, generator=g)
    x = x + torch.rand(n, 3, size, size, generator=g) * 40
    return x.clamp(0, 255).to(torch.uint8)

@pytest.mark.parametrize('cls,space', [(v2.AutoAugment, STANDARD_SPACE), (v2.RandAugment, STANDARD_SPACE),
                                       (v2.TrivialAugmentWide, WIDE_SPACE)])
def test_magnitude_tables_are_torchvisions(cls, space):
    for name, (fn, signed) in cls._AUGMENTATION_SPACE.items():
        assert space[name][1] == signed
        for bins, h, w in [(10, 32, 32), (31, 32, 32), (31, 20, 44)]:
            a, b = space[name][0](bins, h, w), fn(bins, h, w)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name

def test_cifar10_policy_and_op_sets():
    assert CIFAR10_POLICY == tuple(map(tuple, v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies))
    assert tuple(v2.TrivialAugmentWide._AUGMENTATION_SPACE) == RAND_OPS == tuple(v2.RandAugment._AUGMENTATION_SPACE)

@pytest.mark.parametrize('name', [o for o in OPS if o not in GEOMETRIC and o != 'Identity'])
def test_pixel_ops_bit_equal(name):
    x = batch(6)
    fn, signed = WIDE_SPACE[name]
    mags = fn(31, 32, 32)
    ms = [0.] if mags is None else mags[::6].double().tolist()
    ms = ms + [-m for m in ms] if signed else ms
    for m in ms:
        out = apply_policy(x, PolicyDraw(torch.full((6, 1), OPS.index(name)), torch.full((6, 1), m, dtype=torch.float64)))
        for i in range(6): assert torch.equal(out[i], tv_op(x[i], name, m)), (name, m, i)

@pytest.mark.parametrize('name', GEOMETRIC)
def test_geometric_within_bound(name):
    x = batch(4, 1)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing='ij')
    coord = torch.stack([rows * 8, cols * 8, torch.full_like(rows, 255)]).to(torch.uint8)[None]
    hi = WIDE_SPACE[name][0](31, 32, 32)[::3]
    for m in torch.cat([hi, -hi]).tolist():
        out = geometric(x, torch.full((4,), OPS.index(name)), torch.full((4,), m, dtype=torch.float64))
        for i in range(4): assert (out[i] != tv_op(x[i], name, m)).any(0).double().mean() <= GEOMETRIC_BOUND
        a = geometric(coord, torch.tensor([OPS.index(name)]), torch.tensor([m], dtype=torch.float64))[0]
        b = tv_op(coord[0], name, m)
        inside = (a[2] == 255) & (b[2] == 255)
        assert ((a[:2].int() - b[:2].int()).abs() // 8 * inside).max() <= 1      # at most one grid cell apart

@pytest.mark.parametrize('tfm', [TrivialAugmentWide(), RandAugment(num_ops=2, magnitude=12), AutoAugment()])
def test_policy_matches_per_image_reference(tfm):
    x = batch(12, 2)
    d = tfm.draw(x, torch.Generator().manual_seed(0))
    out = apply_policy(x, d)
    geo = torch.isin(d.op, torch.tensor([OPS.index(o) for o in GEOMETRIC])).any(1)
    for i in range(len(x)):
        ref = x[i]
        for j in range(d.op.shape[1]): ref = tv_op(ref, OPS[d.op[i, j]], d.magnitude[i, j].item())
        if geo[i]: assert (out[i] != ref).any(0).double().mean() <= GEOMETRIC_BOUND
        else: assert torch.equal(out[i], ref)
    assert len({tuple(r) for r in torch.cat([d.op, d.magnitude], 1).tolist()}) > 1   # draws differ across the batch
    assert torch.equal(tfm(x, torch.Generator().manual_seed(0)), out)                 # the call = draw + apply

def test_policy_errors():
    with pytest.raises(ValueError, match='trivialaugment'): get_auto_augment('trivial-augment')
    with pytest.raises(ValueError, match='uint8'): TrivialAugmentWide()(batch(2).float())
    with pytest.raises(ValueError, match='pick M'): RandAugment(magnitude=40)(batch(2))

def test_erasing_boxes_match_timm_loop():
    g = torch.Generator().manual_seed(0)
    u = [torch.rand(s, generator=g, dtype=torch.float64) for s in [(64,), (10, 64), (10, 64), (64,), (64,)]]
    boxes = erasing_boxes(*u, 32, 24, p=0.6)
    for i, (t, l, bh, bw) in enumerate(boxes.tolist()):
        want = (0, 0, 0, 0)
        if u[0][i] < 0.6:
            for k in range(10):
                target = (0.02 + (1/3 - 0.02) * u[1][k, i].item()) * 32 * 24
                ar = math.exp(math.log(0.3) + (math.log(1/0.3) - math.log(0.3)) * u[2][k, i].item())
                h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
                if w < 24 and h < 32: want = (math.floor(u[3][i].item() * (32 - h + 1)), math.floor(u[4][i].item() * (24 - w + 1)), h, w); break
        assert (t, l, bh, bw) == want

@pytest.mark.parametrize('tfm', [RandomErasing(p=0.8), RandomErasing(p=1., mode='pixel'), get_erasing('cutout')])
def test_erasing_matches_loop(tfm):
    x = batch(10, 3)
    boxes = tfm.draw(x, torch.Generator().manual_seed(1))
    noise = torch.randint(256, x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    ref = x.clone()
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref[i, :, t:t + h, l:l + w] = tfm.value if tfm.mode == 'const' else noise[i, :, t:t + h, l:l + w]
    assert torch.equal(erase_boxes(x, boxes, tfm.mode, tfm.value, noise=noise), ref)
    assert len({tuple(b) for b in boxes.tolist()}) > 1

def test_cutout_clipped_square():
    assert cutout_boxes(torch.tensor([16, 0, 31]), torch.tensor([16, 3, 31]), 32, 32).tolist() == \
        [[8, 8, 16, 16], [0, 0, 8, 11], [23, 23, 9, 9]]
    with pytest.raises(ValueError, match='--reprob'): RandomErasing(p=2.)

def test_mixup_targets_by_hand():
    t = mixup_target(torch.tensor([0, 2, 1]), 4, lam=0.7, smoothing=0.2)
    torch.testing.assert_close(t, torch.tensor([[0.61, 0.29, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05], [0.29, 0.61, 0.05, 0.05]]))
    logits = torch.randn(3, 4)
    torch.testing.assert_close(soft_target_cross_entropy(logits, mixup_target(torch.tensor([0, 2, 1]), 4, smoothing=0.1)),
                               F.cross_entropy(logits, torch.tensor([0, 2, 1]), label_smoothing=0.1))

def test_mixup_weights_and_cutmix_lambda():
    x, y = batch(4).float(), torch.arange(4)
    torch.testing.assert_close(mix_batch(x, 0.3)[0], 0.3 * x[0] + 0.7 * x[3])
    assert cutmix_box(32, 32, 0.75, 2, 30) == ((0, 10, 22, 32), 1 - 100 / 1024)     # clipped box: its true area
    for seed in range(5):
        mix = Mixup(mixup=0., cutmix=1., smoothing=0., num_classes=4)
        lam, (yl, yh, xl, xh) = mix.draw(32, 32, torch.Generator().manual_seed(seed))
        assert lam == 1 - (yh - yl) * (xh - xl) / 1024
        xm, t = mix(x, y, torch.Generator().manual_seed(seed))
        assert torch.equal(xm[0, :, yl:yh, xl:xh], x[3, :, yl:yh, xl:xh])
        torch.testing.assert_close(t[0], torch.tensor([lam, 0, 0, 1 - lam]))
    lam, box = Mixup(mixup=1., cutmix=0.).draw(32, 32, torch.Generator().manual_seed(0))
    assert box is None and 0 < lam < 1
    with pytest.raises(ValueError, match='--mixup'): Mixup(mixup=0., cutmix=0.)
