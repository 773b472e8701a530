"""The modern training options: each exact against a hand computation, all of them together resumable bit for bit, all off the seed's run."""
import math, os, random, signal, subprocess, sys
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from cifar_kit.learner import Learner, Callback, MetricsCB, CancelFitException
from cifar_kit.callbacks import EMACB, ClipGradCB, MixCB, TTACB
from cifar_kit.learner import flip_tta
from cifar_kit.data.feeders import epoch_generator
from cifar_kit.data.registry import get_dataset
from cifar_kit.data.policies import Mixup
from cifar_kit.config import config_from
from cifar_kit.train import make_optimizer, partial_ce, build_callbacks
from cifar_kit.core import create_model


class Feeder:
    "Batches of the digits test images (3×32×32, scaled to 0..1), in a fixed order"
    def __init__(self, n=256, bs=64):
        ds = get_dataset('digits', train=False)
        self.x, self.y, self.bs = ds.images[:n].float() / 255, ds.labels[:n].long(), bs
    def __len__(self): return math.ceil(len(self.x) / self.bs)
    def __iter__(self):
        for i in range(0, len(self.x), self.bs): yield self.x[i:i+self.bs], self.y[i:i+self.bs]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))


def learner(cbs=(), lr=0.1, loss=F.cross_entropy, **kw):
    model = small_net()
    return Learner(model, Feeder(**kw), {'test': Feeder(128)}, loss, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), cbs=[MetricsCB(10), *cbs])


class After(Callback):
    "Record `fn(learn)` at event `event` (training batches only)"
    def __init__(self, event, fn, order=50):
        self.order, self.fn, self.seen = order, fn, []
        setattr(self, event, lambda: self.seen.append(fn(self.learn)) if self.learn.training else None)


# ---------------------------------------------------------------- EMA

def test_ema_equals_hand_computed_average():
    "After k steps the average is w_1 decayed by hand: ema = d*ema + (1-d)*w_t, weights and BN statistics alike"
    snap = After('after_step', lambda l: [t.detach().double().clone() for t in [*l.model.parameters(), *l.model.buffers()] if t.is_floating_point()])
    ema = EMACB(decay=0.8)
    learn = learner([ema, snap]).fit(1)
    k = len(snap.seen); assert k == 4
    hand = snap.seen[0]
    for w in snap.seen[1:]: hand = [0.8 * a + 0.2 * b for a, b in zip(hand, w)]
    got = [t for t in [*ema.ema.module.parameters(), *ema.ema.module.buffers()] if t.is_floating_point()]
    assert len(got) == len(hand)
    for h, g in zip(hand, got): torch.testing.assert_close(g.double(), h, rtol=1e-6, atol=1e-7 * h.abs().max().item())
    assert int(ema.ema.n_averaged) == k
    assert not torch.equal(got[0].double(), snap.seen[-1][0])   # the average is not the model
    row = learn.history[-1]
    assert {'ema_test_loss', 'ema_test_top1'} <= set(row) and 0 <= row['ema_test_top1'] <= 100


def test_ema_evaluation_matches_a_plain_evaluation():
    "The ema_* columns are the averaged model's own loss and top-1 on the evaluation set (with flip TTA when asked)"
    ema = EMACB(decay=0.5, tta=True)
    learn = learner([ema]).fit(1)
    model = ema.ema.module.eval()
    with torch.no_grad():
        x, y = Feeder(128).x, Feeder(128).y
        p = flip_tta(model, x)
    row = learn.history[-1]
    assert row['ema_test_top1'] == pytest.approx(100 * (p.argmax(1) == y).float().mean().item())
    assert row['ema_test_loss'] == pytest.approx(F.cross_entropy(p, y).item(), rel=1e-5)


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize('alphas', [(0.8, 0.0), (0.0, 1.0)], ids=['mixup', 'cutmix'])
def test_mixing_targets_and_weights_through_the_training_step(alphas):
    "In the step: images mixed with the reversed batch, targets weighted by lambda, loss = soft-target CE, train top-1 on the true labels"
    mix = Mixup(*alphas, smoothing=0.0, num_classes=10)
    before = After('before_batch', lambda l: (l.xb.clone(), l.yb.clone()), order=-30)
    step = After('after_loss', lambda l: (l.xb, l.target, l.preds.detach(), l.loss.detach()))
    learn = learner([MixCB(mix, seed=5), before, step], loss=partial_ce(0.0)).fit(1)
    g, hits, n = random.Random(epoch_generator(5, 0, 0, MixCB.stream).initial_seed()), 0, 0   # the callback's host draws
    for (x0, y), (x, t, p, loss) in zip(before.seen, step.seen):
        lam, box = mix.draw(32, 32, g)
        assert 0 <= lam <= 1
        hot, rev = F.one_hot(y, 10).float(), F.one_hot(y.flip(0), 10).float()
        torch.testing.assert_close(t, lam * hot + (1 - lam) * rev)                          # the weights
        if alphas[1]:   # CutMix: the reversed batch pasted into the box, lambda = the area left
            assert box is not None
            yl, yh, xl, xh = box
            inside = torch.zeros(32, 32, dtype=torch.bool); inside[yl:yh, xl:xh] = True
            assert torch.equal(x[..., inside], x0.flip(0)[..., inside]) and torch.equal(x[..., ~inside], x0[..., ~inside])
            assert lam == pytest.approx(1 - inside.sum().item() / (32 * 32))
        else:
            assert box is None
            torch.testing.assert_close(x, lam * x0 + (1 - lam) * x0.flip(0))
        torch.testing.assert_close(loss, -(t * p.log_softmax(-1)).sum(-1).mean())
        hits, n = hits + (p.argmax(1) == y).sum().item(), n + len(y)
    assert len(step.seen) == len(Feeder()) and learn.history[-1]['train_top1'] == pytest.approx(100 * hits / n)


def test_smoothing_goes_into_the_mixed_targets_once(tmp_path):
    c = config_from('resnet20-digits', mixup=0.8, label_smoothing=0.1)
    mix = [cb for cb in build_callbacks(c, tmp_path, 10, None, torch.device('cpu')) if isinstance(cb, MixCB)][0].mix
    assert (mix.mixup, mix.cutmix, mix.smoothing, mix.num_classes) == (0.8, 0.0, 0.1, 10)
    logits, t = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    torch.testing.assert_close(partial_ce(0.1)(logits, t), -(t * logits.log_softmax(-1)).sum(-1).mean())   # no second smoothing


# ---------------------------------------------------------------- optimiser

@pytest.mark.parametrize('arch', ['resnet20', 'preresnet20', 'wrn16_2', 'vgg11_bn'])
def test_weight_decay_groups_hold_exactly_the_norm_and_bias_parameters(arch):
    m = create_model(arch, num_classes=10)
    opt = make_optimizer(m, config_from(arch=arch, dataset='cifar10', opt_no_wd_1d=True, nesterov=True), torch.device('cpu'))
    decay, free = opt.param_groups
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    expected = {id(p) for mod in m.modules() for name, p in mod.named_parameters(recurse=False) if isinstance(mod, norms) or name == 'bias'}
    assert {id(p) for p in free['params']} == expected and expected
    assert {id(p) for p in decay['params']} == {id(p) for p in m.parameters()} - expected
    assert (free['weight_decay'], decay['weight_decay'], opt.defaults['nesterov']) == (0.0, 5e-4, True)
    plain = make_optimizer(m, config_from(arch=arch, dataset='cifar10'), torch.device('cpu'))
    assert len(plain.param_groups) == 1 and plain.defaults['nesterov'] is False and plain.defaults['weight_decay'] == 5e-4


def grad_norm(l): return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in l.model.parameters()])).item()

@pytest.mark.parametrize('scaled', [False, True], ids=['fp32', 'grad-scaler'])
def test_clipping_bounds_the_gradient_norm(scaled):
    "The step sees a global norm of at most max_norm; with a GradScaler it is the unscaled gradient that is clipped"
    free, clipped = After('after_backward', grad_norm), After('after_backward', grad_norm)
    learner([free], lr=0.5).fit(1)
    l = learner([ClipGradCB(0.05), clipped], lr=0.5)
    if scaled: l.scaler = torch.amp.GradScaler('cpu', init_scale=1024.)
    l.fit(1)
    assert min(free.seen) > 0.05
    assert max(clipped.seen) <= 0.05 * (1 + 1e-5) and min(clipped.seen) >= 0.05 * 0.999, clipped.seen   # clipped to max_norm, not max_norm/scale


def test_tta_is_the_mean_softmax_of_the_image_and_its_mirror():
    m = small_net().eval(); x = Feeder(8).x
    with torch.no_grad():
        torch.testing.assert_close(flip_tta(m, x).exp(), (m(x).softmax(-1) + m(x.flip(-1)).softmax(-1)) / 2)
        l = learner([TTACB()]).fit(1)
        assert 0 <= l.history[-1]['test_top1'] <= 100


# ---------------------------------------------------------------- whole runs

EVERY = dict(aa='rand-m9-n2', reprob=0.5, mixup=0.8, cutmix=1.0, mixup_prob=0.9, mixup_switch_prob=0.5, label_smoothing=0.1,
             nesterov=True, opt_no_wd_1d=True, model_ema=True, model_ema_decay=0.9, clip_grad=1.0, tta=True)

WORKER = r"""
import os, signal, sys, json
from cifar_kit.learner import Callback
from cifar_kit.train import train
count, seen = int(os.environ.get('KILL_AT_BATCH', 0)), [0]
class KillAtBatch(Callback):
    def after_backward(self):
        if self.learn.training:
            seen[0] += 1
            if seen[0] == count: os.kill(os.getpid(), signal.SIGKILL)
train(recipe='resnet20-digits', epochs=2, limit_batches=2, deterministic=True, device='cpu', progress='off', eval_batch_size=512,
      run_dir=sys.argv[1], cbs=[KillAtBatch()], **json.loads(sys.argv[2]))
"""

def test_every_option_on_resumes_bit_exactly_after_sigkill(tmp_path):
    "Killed in epoch 2 (its first step done) and rerun, a run with every option on ends bit-identical: weights, optimiser, EMA state, history"
    import json
    def run(d, kill=0):
        env = dict(os.environ, KILL_AT_BATCH=str(kill), OMP_NUM_THREADS='1')
        return subprocess.run([sys.executable, '-c', WORKER, str(d), json.dumps(EVERY)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = run(tmp_path/'ref'); assert ref.returncode == 0, ref.stderr.decode()[-2000:]
    d = tmp_path/'killed'
    p = run(d, kill=3); assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert torch.load(d/'last.pt', weights_only=True)['epoch'] == 1   # one epoch saved, the second lost
    p = run(d); assert p.returncode == 0, p.stderr.decode()[-2000:]
    a, b = torch.load(d/'last.pt', weights_only=True), torch.load(tmp_path/'ref'/'last.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    same = lambda x, y: x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert same(a['model'], b['model'])
    assert same(a['callbacks']['ema'], b['callbacks']['ema']) and int(a['callbacks']['ema']['n_averaged']) == 4
    assert not same(a['callbacks']['ema'], {'n_averaged': a['callbacks']['ema']['n_averaged'], **{'module.' + k: v for k, v in a['model'].items()}})
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer']) for k in sa)
    strip = lambda h: [{k: v for k, v in r.items() if 'seconds' not in k} for r in h]
    assert strip(a['history']) == strip(b['history'])
    assert {'ema_test_top1', 'ema_test_loss'} <= set(a['history'][-1])
    assert 'ema_test_top1_pct' in (d/'history.csv').read_text().splitlines()[0]


_FAITHFUL = """
import sys, torch, torch.nn.functional as F
from cifar_kit.core import seed_everything
from cifar_kit.config import config_from
from cifar_kit.train import setup, train, Take
c = config_from('resnet20-digits', epochs=2, limit_batches=4, deterministic=True, device='cpu', progress='off', run_dir=sys.argv[1])
seed_everything(c.seed, c.deterministic)               # the faithful loop, by hand: the seed's SGD step, nothing else
s = setup(c)
model, opt, sched, dl = s['model'], s['opt'], s['sched'], Take(s['loaders'].train, c.limit_batches)
for epoch in range(c.epochs):
    model.train(); dl.set_epoch(epoch)
    for xb, yb in dl: F.cross_entropy(model(xb), yb).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    sched.step()
train(c)                                               # the kit's run, every modern option at its default
sd, ref = torch.load(sys.argv[1] + '/last.pt', weights_only=True)['model'], model.state_dict()
print(sorted(sd) == sorted(ref), sum(not torch.equal(sd[k], ref[k]) for k in ref))
"""


def test_every_option_off_is_the_faithful_loop_bit_for_bit(tmp_path):
    "With all the options at their defaults, `train` gives the weights of a hand-written seed loop, bit for bit (one machine, one process)"
    p = subprocess.run([sys.executable, '-c', _FAITHFUL, str(tmp_path/'run')], env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == ['True', '0'], p.stdout   # the same tensors, and none of them differs in any bit
    assert 'callbacks' not in torch.load(tmp_path/'run'/'last.pt', weights_only=True)   # the checkpoint is the faithful one too
