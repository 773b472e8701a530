"The `-paper` twins of the anchored rows: AutoAugment's order (policy, then crop and flip), the recipes, the statistics."
import torch
import torch.nn.functional as F
from cifar_kit.data.augment import CropFlip
from cifar_kit.data.policies import AutoAugment, PolicyDraw, RandomErasing, apply_policy
from cifar_kit.loaders import train_batch_tfm, get_loaders
from cifar_kit.config import config_from


def batch(n=10, seed=0):
    return torch.randint(256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

# ---- 1. the policy before the crop


def test_policy_first_equals_a_per_image_reference():
    "AutoAugment on the unpadded image, then zero-pad 4, crop and flip: image by image, with the same draws"
    x, n = batch(), 10
    out = train_batch_tfm('cifar10', aa='autoaugment', aa_first=True)(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)   # the same stream, drawn in the chain's order: policy, offsets, flips
    d = AutoAugment().draw(x, g)
    offsets, flips = torch.randint(0, 9, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5
    for i in range(n):
        img = apply_policy(x[i:i + 1], PolicyDraw(d.op[i:i + 1], d.magnitude[i:i + 1]))[0]
        top, left = offsets[i].tolist()
        ref = F.pad(img, (4, 4, 4, 4))[:, top:top + 32, left:left + 32]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref), i
    assert flips.any() and not flips.all() and (d.op != d.op[0]).any()   # both branches and several sub-policies ran


def test_default_order_unchanged():
    "Without aa_first: crop and flip, then the policy, then Cutout, each drawing from the one generator in turn"
    x, mean = batch(12, 1), (0.5, 0.25, 0.)
    out = train_batch_tfm('cifar10', aa='autoaugment', cutout=16, mean=mean)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ref = RandomErasing(p=1., cutout=16, value=(128, 64, 0))(AutoAugment()(CropFlip(4)(x, g), g), g)
    assert torch.equal(out, ref)
    assert not torch.equal(out, train_batch_tfm('cifar10', aa='autoaugment', cutout=16, mean=mean, aa_first=True)(
        x, torch.Generator().manual_seed(5)))


def test_aa_first_reaches_the_feeder():
    L = get_loaders('digits', batch_size=64, device='cpu', aa='autoaugment', aa_first=True, cutout=4)
    assert [type(t).__name__ for t in L.train.batch_tfm.tfms] == ['AutoAugment', 'CropFlip', 'RandomErasing']
    assert config_from(arch='resnet20', dataset='digits', aa='autoaugment', aa_first=True).aa_first
