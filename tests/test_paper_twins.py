"The `-paper` twins of the anchored rows: AutoAugment's order (policy, then crop), the recipes, the statistics."
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

# ---- 2. the recipes


def test_paper_twins_train_as_the_official_code():
    w = config_from('wrn28_10-c10-paper')   # AutoAugment's train_cifar.py, helper_utils.py, data_utils.py, wrn.py
    assert (w.epochs, w.batch_size, w.lr, w.momentum, w.wd, w.nesterov, w.clip_grad, w.schedule, w.milestones) == \
           (200, 128, 0.1, 0.9, 5e-4, True, 5.0, 'cosine', ())
    assert w.sched_per_step and not config_from('wrn28_10-c10-modern').sched_per_step
    assert (w.aa, w.cutout, w.aa_first, w.model_kwargs, w.norm, w.paper_stat, w.anchor_err) == \
           ('autoaugment', 16, True, {'drop': 0.0}, 'cifar10', 'mean_of_5', 2.6)
    d = config_from('densenet_bc_190_40-c100-paper')   # mixup-cifar10's train.py
    assert (d.epochs, d.batch_size, d.lr, d.momentum, d.wd, d.nesterov, d.milestones, d.gamma, d.schedule, d.mixup) == \
           (200, 128, 0.1, 0.9, 1e-4, False, (100, 150), 0.1, 'multistep', 1.0)
    assert (d.cutmix, d.label_smoothing, d.aa, d.norm, d.paper_stat, d.anchor_err) == \
           (0.0, 0.0, '', 'seed_cifar', 'median_last10', 16.8)


def test_same_budget_twins_unchanged_beside_them():
    from cifar_kit.recipes import RECIPES
    for k in ('wrn28_10-c10', 'wrn28_10-c100', 'densenet_bc_190_40-c10', 'densenet_bc_190_40-c100'):
        m, p, f = RECIPES[f'{k}-modern'], RECIPES[f'{k}-paper'], RECIPES[k]
        assert (m.epochs, m.batch_size, m.milestones, m.model_kwargs) == \
               (f.epochs, f.batch_size, f.milestones, f.model_kwargs)
        assert (m.twin_kind, p.twin_kind, m.anchor_err, m.paper_stat) == \
               ('same budget', 'as the paper', p.anchor_err, 'final')
        assert (p.arch, p.dataset, p.faithful) == (f.arch, f.dataset, k) and 'trained as in' in p.source and p.note
