"""airbench's training parts (`cifar_kit.fast`) and the per-step schedule: each against a naive formula or a hand-written
update, and runs that resume bit for bit."""
import math
import pytest
import torch
from torch import nn
from cifar_kit.learner import Learner, Callback
from cifar_kit.config import config_from
from cifar_kit.core import create_model
from cifar_kit.loaders import get_loaders
from cifar_kit.train import train, make_scheduler, make_optimizer, Take
from cifar_kit.fast import LookaheadCB, WhitenBiasCB, fast_param_groups, kilostep_scale
from cifar_kit.run.signals import RunInterrupted
from run_helpers import TINY


class LRs(Callback):
    "The lr of every optimiser step (the first group's), read before the step"
    order = 50
    def __init__(self): self.seen = []
    def before_backward(self): self.seen.append(self.learn.opt.param_groups[0]['lr'])


class StopAfter(Callback):
    "A crash after `n` epochs (their checkpoint written)"
    order = 50
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.learn.epoch == self.n: raise KeyboardInterrupt


def same_checkpoints(a, b):
    "Weights, optimiser state, scheduler and callback states equal, bit for bit; both checkpoints"
    ca, cb = torch.load(a/'last.pt', weights_only=True), torch.load(b/'last.pt', weights_only=True)
    assert ca['model'].keys() == cb['model'].keys()
    for k in ca['model']: assert torch.equal(ca['model'][k], cb['model'][k]), k
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer']) for k in sa)
    assert ca['scheduler'] == cb['scheduler']
    xa, xb = ca.get('callbacks', {}), cb.get('callbacks', {})
    assert xa.keys() == xb.keys()
    if 'lookahead' in xa:
        assert xa['lookahead']['n'] == xb['lookahead']['n']
        assert all(torch.equal(v, xb['lookahead']['ema'][k]) for k, v in xa['lookahead']['ema'].items())
    strip = lambda h: [{k: v for k, v in r.items() if 'seconds' not in k} for r in h]
    assert strip(ca['history']) == strip(cb['history'])
    return ca, cb


def interrupted_then_resumed(tmp_path, kw, cbs=()):
    "The uninterrupted run of `kw`, and the same run stopped after epoch 1 and rerun (`cbs` watch the rerun)"
    full = train(**kw, run_dir=str(tmp_path/'full'))
    with pytest.raises(RunInterrupted): train(**kw, run_dir=str(tmp_path/'cut'), cbs=[StopAfter(1)])
    return full, train(**kw, run_dir=str(tmp_path/'cut'), cbs=list(cbs))


# ---------------------------------------------------------------- the per-step schedule

PER_STEP = dict(TINY, epochs=3, limit_batches=3, batch_size=32, schedule='cosine', warmup_epochs=1, sched_per_step=True, eval_every=0)


def naive_cosine(lr, s, n, epochs, warmup):
    "Step `s`'s lr of a linear warm-up (`warmup` epochs) then a cosine, both counted in steps of `n` per epoch"
    W, T = warmup * n, (epochs - warmup) * n
    return lr * (s + 1) / (W + 1) if s < W else lr / 2 * (1 + math.cos(math.pi * (s - W) / T))


def test_per_step_cosine_has_the_naive_lr_at_every_step_and_resumes_exactly(tmp_path):
    "Stopped after epoch 1 (mid-plan, warm-up done) and rerun: the steps after the restart have the naive lr, and the run ends bit-identical"
    lrs = LRs()
    full, cut = interrupted_then_resumed(tmp_path, PER_STEP, [lrs])
    lr = config_from('resnet20-digits').lr
    assert lrs.seen == pytest.approx([naive_cosine(lr, s, 3, 3, 1) for s in range(3, 9)], rel=1e-12)
    same_checkpoints(tmp_path/'full', tmp_path/'cut')
    assert [r['lr'] for r in cut.history] == [r['lr'] for r in full.history]
    assert [r['lr'] for r in full.history] == pytest.approx([naive_cosine(lr, s, 3, 3, 1) for s in (0, 3, 6)], rel=1e-12)


def test_per_step_milestones_fall_at_their_step():
    c = config_from('resnet20-digits', epochs=4, milestones=(1, 3), sched_per_step=True)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=c.lr); s = make_scheduler(opt, c, 5); got = []
    for _ in range(20): got.append(opt.param_groups[0]['lr']); opt.step(); s.step()
    assert got == pytest.approx([c.lr * c.gamma ** ((i >= 5) + (i >= 15)) for i in range(20)], rel=1e-12)


def test_a_longer_plan_rebuilds_the_per_step_schedule_at_the_epoch_boundary(tmp_path):
    "A 2-epoch run grown to 3: from step 2*3 on, every step has the lr of a fresh 3-epoch plan"
    kw = dict(PER_STEP, warmup_epochs=0)
    train(**(kw | {'epochs': 2}), run_dir=str(tmp_path/'grown'))
    lrs = LRs()
    grown = train(**kw, run_dir=str(tmp_path/'grown'), cbs=[lrs])
    assert lrs.seen == pytest.approx([naive_cosine(0.05, s, 3, 3, 0) for s in range(6, 9)], rel=1e-12)
    assert grown.record['plan_changes'][0]['at_epoch'] == 2


# ---------------------------------------------------------------- airbench's optimiser

AB = dict(lr=11.5, wd=0.0153, momentum=0.85, nesterov=True, batch_size=512)


def test_param_groups_hold_exactly_the_norm_parameters_at_64x():
    "airbench94's groups: its 6 BatchNorms' parameters at 64x the lr and 1/64 the wd; every other parameter at the decoupled lr, wd"
    m = create_model('airbench94')
    c = config_from(arch='airbench94', dataset='digits', decoupled=True, norm_lr_scale=64.0, **AB)
    rest, norm = make_optimizer(m, c, torch.device('cpu')).param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    bns = [f'stage{i}.norm{j}.{w}' for i in (1, 2, 3) for j in (1, 2) for w in ('weight', 'bias')]
    assert sorted(names[id(p)] for p in norm['params']) == sorted(bns)
    assert sorted(names[id(p)] for p in rest['params']) == sorted(set(names.values()) - set(bns))
    assert 'stem.whiten.bias' in [names[id(p)] for p in rest['params']]
    lr = 11.5 * 512 / (1024 * (1 + 1 / (1 - 0.85)))   # the mean loss's lr: airbench's 11.5/K for a summed loss, times the batch
    assert (rest['lr'], rest['weight_decay']) == pytest.approx((lr, 0.0153 / 11.5), rel=1e-12)
    assert (norm['lr'], norm['weight_decay']) == pytest.approx((64 * lr, 0.0153 / 11.5 / 64), rel=1e-12)
    assert rest['nesterov'] and rest['momentum'] == 0.85
    assert kilostep_scale(0.85) == pytest.approx(1024 * (1 + 1 / 0.15), rel=1e-12)
    # without --decoupled the lr and wd are PyTorch's own; the norm group still takes the scale
    r2, n2 = fast_param_groups(m, 0.1, 5e-4, 64)
    assert (r2['lr'], r2['weight_decay'], n2['lr'], n2['weight_decay']) == pytest.approx((0.1, 5e-4, 6.4, 5e-4 / 64), rel=1e-12)


def test_mean_loss_at_the_decoupled_lr_steps_as_airbench_summed_loss():
    "airbench: summed smoothed CE, lr L/K, wd W*B/K / lr; the kit: mean loss at `decoupled_hyp`: the same three Nesterov steps"
    from cifar_kit.fast import decoupled_hyp
    torch.manual_seed(0); ref = nn.Linear(6, 4); x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    def steps(reduction, lr, wd):
        m = nn.Linear(6, 4); m.load_state_dict(ref.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=lr, weight_decay=wd, momentum=0.85, nesterov=True)
        for _ in range(3):
            opt.zero_grad(); nn.functional.cross_entropy(m(x), y, label_smoothing=0.2, reduction=reduction).backward(); opt.step()
        return m.weight.detach()
    K = 1024 * (1 + 1 / 0.15); lr = 11.5 / K
    torch.testing.assert_close(steps('mean', *decoupled_hyp(11.5, 0.0153, 0.85, 16)), steps('sum', lr, 0.0153 * 16 / K / lr), rtol=1e-5, atol=1e-6)


def naive_triangle(t, T, start=0.2, peak=0.23, end=0.07):
    top = int(peak * T)
    xs, ys = [0, top, T], [start, 1.0, end]
    i = 0 if t < top else 1
    return ys[i] + (ys[i + 1] - ys[i]) * (t - xs[i]) / (xs[i + 1] - xs[i])


# every part on, on the digits (32x32, so airbench's three poolings fit), 3 steps an epoch: cheap, and Lookahead pulls at step 5
FAST = dict(TINY, arch='airbench94', dataset='digits', recipe=None, milestones=(), epochs=2, limit_batches=3, batch_size=64,
            lr=11.5, wd=0.0153, momentum=0.85, nesterov=True, decoupled=True, norm_lr_scale=64.0, label_smoothing=0.2,
            schedule='triangle', sched_per_step=True, lookahead=True, whiten_init=300, whiten_bias_epochs=1, eval_every=0)


def test_airbench94_on_the_digits_resumes_exactly_with_every_part_on(tmp_path):
    "Stopped after epoch 1 and rerun: weights, optimiser, schedule, Lookahead's average and history equal the uninterrupted run's"
    lrs = LRs()
    full, cut = interrupted_then_resumed(tmp_path, FAST, [lrs])
    ca, _ = same_checkpoints(tmp_path/'full', tmp_path/'cut')
    assert ca['callbacks']['lookahead']['n'] == 6
    lr = 11.5 * 64 / kilostep_scale(0.85)
    assert lrs.seen == pytest.approx([lr * naive_triangle(t, 6) for t in range(3, 6)], rel=1e-12)
    assert [('test_top1' in r) for r in full.history] == [False, True]   # evaluated after the last epoch only
    for k, v in ca['model'].items():   # the run ends on Lookahead's average
        if v.is_floating_point(): assert torch.equal(v, ca['callbacks']['lookahead']['ema'][k]), k


def test_triangle_is_airbench_formula_at_every_step():
    c = config_from(arch='airbench94', dataset='digits', epochs=10, milestones=(), schedule='triangle', sched_per_step=True)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0); s = make_scheduler(opt, c, 98); got = []
    for _ in range(980): got.append(opt.param_groups[0]['lr']); opt.step(); s.step()
    assert got == pytest.approx([naive_triangle(t, 980) for t in range(980)], rel=1e-12, abs=1e-15)
    assert got[0] == pytest.approx(0.2) and max(got) == got[int(0.23 * 980)] == pytest.approx(1.0)


# ---------------------------------------------------------------- Lookahead and the whitening bias

def test_lookahead_equals_a_hand_written_update():
    "Every 2 steps φ ← d φ + (1-d) θ, θ ← φ with d = 0.95^5 (t/T)^3; T = 9 is no multiple of 2, so the end pulls once more"
    class Snap(Callback):
        order = 5
        def __init__(self): self.seen = []
        def after_step(self): self.seen.append({k: v.clone() for k, v in self.learn.model.state_dict().items() if v.is_floating_point()})
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    phi = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    snap, la = Snap(), LookaheadCB(every=2)
    Learner(net, data, opt=torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9), cbs=[snap, la]).fit(3)
    for t in (2, 4, 6, 8):
        d = 0.95**5 * (t / 9) ** 3
        phi = {k: d * phi[k] + (1 - d) * snap.seen[t - 1][k] for k in phi}
    got = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    for k in phi: torch.testing.assert_close(got[k], phi[k], rtol=1e-6, atol=1e-7)   # step 9's weights were replaced by φ
    assert not torch.equal(got['0.weight'], snap.seen[-1]['0.weight'])


def test_whitening_bias_trains_three_epochs_then_is_frozen():
    class Watch(Callback):
        order = 50
        def __init__(self): self.bias, self.grad = [], []
        def after_backward(self): self.grad.append(self.learn.model.stem.whiten.bias.grad is not None)
        def after_epoch(self): self.bias.append(self.learn.model.stem.whiten.bias.detach().clone())
    ld = get_loaders('digits', 'cpu', batch_size=32)
    torch.manual_seed(0); m = create_model('airbench94'); b0 = m.stem.whiten.bias.detach().clone(); w = Watch()
    Learner(m, Take(ld.train, 1), opt=torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), cbs=[WhitenBiasCB(3), w]).fit(5)
    assert w.grad == [True, True, True, False, False]
    b = [b0] + w.bias
    assert [not torch.equal(b[i], b[i + 1]) for i in range(5)] == [True, True, True, False, False]


# ---------------------------------------------------------------- the recipes

@pytest.mark.parametrize('row', ['airbench94-c10', 'airbench96-c10'])
def test_airbench_recipes_are_airbench_hyp_on_a_track_of_their_own(row):
    from cifar_kit.recipes import RECIPES, validate_recipe
    from cifar_kit.reproduction.driver import benchmark_rows
    r = validate_recipe(RECIPES[row])
    hyp = {'airbench94-c10': (10, 11.5, (64, 256, 256), {'pad': 2}),
           'airbench96-c10': (40, 9.0, (128, 512, 512), {'pad': 4, 'cutout': 12})}[row]   # airbench's translate 2 and 4
    assert (r.epochs, r.lr, r.momentum, r.wd, r.batch_size, r.track, r.faithful) == (hyp[0], hyp[1], 0.85, 0.0153, 1024, 'fast', '')
    assert [m.out_channels for m in (create_model(r.arch).stage1.conv1, create_model(r.arch).stage2.conv1, create_model(r.arch).stage3.conv1)] == list(hyp[2])
    assert r.options == dict(schedule='triangle', sched_per_step=True, decoupled=True, nesterov=True, norm_lr_scale=64.0,
                             label_smoothing=0.2, lookahead=True, whiten_init=5000, whiten_bias_epochs=3, eval_every=0,
                             tta=True, tta_shift=True, amp='auto', flip='alternate', pad_mode='reflect') | hyp[3]
    assert r.anchor_err == {'airbench94-c10': 6.0, 'airbench96-c10': 4.0}[row] and 'arXiv:2404.00498' in r.source
    assert row not in benchmark_rows()   # not a row of the seed's table
    c = config_from(row)
    assert all(getattr(c, k) == v for k, v in r.options.items())


def test_airbench94_recipe_trains_through_the_command_line(tmp_path, capsys):
    "`cifar-kit train --recipe airbench94-c10` on a tiny CIFAR-10 folder: done, evaluated at the end only, with TTA level 2"
    from cifar_kit.data.readers import write_fake_cifar
    from cli_helpers import run_cli
    write_fake_cifar(tmp_path/'data', n=8)   # 40 training images: one batch of the recipe's 1024 an epoch
    code, out, err = run_cli(capsys, 'train', '--recipe', 'airbench94-c10', '--epochs', 2, '--limit-batches', 2,
                             '--data-dir', tmp_path/'data', '--out-dir', tmp_path/'run', '--device', 'cpu', '--progress', 'off')
    assert code in (0, None), err
    import json
    rec = json.loads((tmp_path/'run'/'run.json').read_text())
    assert (rec['status'], rec['epochs'], rec['recipe']) == ('done', 2, 'airbench94-c10')
    rows = (tmp_path/'run'/'history.csv').read_text().splitlines()
    head = rows[0].split(',')
    assert [r.split(',')[head.index('test_top1_pct')] != '' for r in rows[1:]] == [False, True]
    assert json.loads((tmp_path/'run'/'config.json').read_text())['tta_shift'] is True


def test_a_changed_plan_rebuilds_the_triangle_for_each_group_at_the_epoch_boundary():
    "Resumed after epoch 1 into a 2-epoch plan of 3 steps each: both groups (lr and 64x) restart at step 3 of a fresh triangle"
    from cifar_kit.train import _rebuild_scheduler
    c = config_from(arch='airbench94', dataset='digits', epochs=2, milestones=(), schedule='triangle', sched_per_step=True)
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    opt = torch.optim.SGD([{'params': a.parameters(), 'lr': 0.5}, {'params': b.parameters(), 'lr': 32.0}], lr=0.5)
    make_scheduler(opt, c, 3)                                  # the first run's schedule sets each group's initial_lr
    for g in opt.param_groups: g['lr'] = 123.0                  # whatever the checkpoint's lr was
    _rebuild_scheduler(opt, c, 1, 3)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.5 * naive_triangle(3, 6), 32.0 * naive_triangle(3, 6)], rel=1e-12)
