"""The accelerator's fused policy pass against every op on the whole batch (the previous path), image for image and
bit for bit, and what it queues per batch: fewer aten ops, no read, no data-dependent shape (tiny batches, CPU)."""
import pytest
import torch
from cifar_kit.learner import DispatchCounter
from cifar_kit.data.policies import (OPS, GEOMETRIC, STANDARD_SPACE, WIDE_SPACE, PolicyDraw, apply_policy, geometric,
                                     brightness, color, contrast, sharpness, posterize, solarize, autocontrast,
                                     equalize, invert, TrivialAugmentWide, RandAugment, AutoAugment)

PIXEL = {'Brightness': brightness, 'Color': color, 'Contrast': contrast, 'Sharpness': sharpness,
         'Posterize': posterize, 'Solarize': solarize, 'AutoContrast': autocontrast, 'Equalize': equalize,
         'Invert': invert}

def every_op(x, op, m, fill=None):
    "The previous accelerator path: every op on the whole batch, `torch.where` keeping each image's own op's result"
    geo = torch.zeros_like(op, dtype=torch.bool)
    for name in GEOMETRIC: geo |= op == OPS.index(name)
    out = torch.where(geo[:, None, None, None], geometric(x, op, m, fill), x)
    for name, fn in PIXEL.items(): out = torch.where((op == OPS.index(name))[:, None, None, None], fn(x, m), out)
    return out

def every_op_policy(x, d, fill=None):
    for j in range(d.op.shape[1]): x = every_op(x, d.op[:, j], d.magnitude[:, j], fill)
    return x

def fused(x, d, fill=None): return apply_policy(x, d, fill, grouped=False)

def batch(n=8, seed=0, c=3, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, 1, 1, generator=g) * 200 + torch.rand(n, c, h, w, generator=g) * 60
    x[0] = 90                                                    # a flat image: AutoContrast and Equalize keep it
    return x.clamp(0, 255).to(torch.uint8)

POLICIES = [TrivialAugmentWide(), RandAugment(num_ops=3, magnitude=20), AutoAugment(),
            TrivialAugmentWide(fill=(124, 116, 104))]

@pytest.mark.parametrize('tfm', POLICIES, ids=lambda t: type(t).__name__ + ('_fill' if t.fill else ''))
def test_fused_is_every_op_bit_for_bit(tfm):
    for seed, shape in enumerate([(32, 3, 32, 32), (16, 1, 32, 32), (16, 3, 2, 9), (1, 3, 32, 32)]):
        x = batch(*shape[:1], seed, *shape[1:])
        if tfm.fill is not None and shape[1] != 3: continue          # a fill colour per channel
        d = tfm.draw(x, torch.Generator().manual_seed(seed))
        assert torch.equal(fused(x, d, tfm.fill), every_op_policy(x, d, tfm.fill)), shape

@pytest.mark.parametrize('name', [o for o in OPS if o not in GEOMETRIC])
def test_each_pixel_op_over_its_range(name):
    "Every image its own magnitude, beyond the tables' range both ways: the fused pass is the op itself"
    x = batch(48, 5)
    mags = {**STANDARD_SPACE, **WIDE_SPACE}[name][0](31, 32, 32)
    lo, hi = (0., 1.) if mags is None else (-1.2 * mags.abs().max().item(), 1.2 * mags.abs().max().item())
    if name == 'Posterize': lo, hi = -1., 9.5
    m = lo + (hi - lo) * torch.rand(48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    d = PolicyDraw(torch.full((48, 1), OPS.index(name)), m[:, None])
    want = x if name == 'Identity' else PIXEL[name](x, m)
    assert torch.equal(fused(x, d), want)

def ops(apply, tfm, x):
    "The aten ops one batch queues through `apply`, warm (the constant tables exist)"
    apply(x, tfm.draw(x, torch.Generator().manual_seed(0)), tfm.fill)
    with DispatchCounter() as dc: apply(x, tfm.draw(x, torch.Generator().manual_seed(0)), tfm.fill)
    return dc

@pytest.mark.parametrize('tfm', POLICIES[:3], ids=lambda t: type(t).__name__)
def test_fused_queues_fewer_ops_and_never_waits(tfm):
    x = batch(16)
    before, after = ops(every_op_policy, tfm, x), ops(fused, tfm, x)
    assert (after.reads, after.from_python, after.data_dependent) == (0, 0, 0)
    layers = tfm.draw(x).op.shape[1]
    # a layer of the fused pass: 9 of the old path's 10 pipelines are gone (measured: 241 -> 147 ops per batch for
    # TrivialAugmentWide); at least a quarter fewer per layer, whatever small op a later torch adds
    assert after.total < before.total - 40 * layers, (before.total, after.total)
