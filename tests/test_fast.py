"""airbench's training parts (`cifar_kit.fast`) and the per-step schedule: each against a naive formula or a hand-written
update, and runs that resume bit for bit."""
import math
import pytest
import torch
from torch import nn
from cifar_kit.learner import Callback
from cifar_kit.config import config_from
from cifar_kit.train import train, make_scheduler
from cifar_kit.run.signals import RunInterrupted
from run_helpers import TINY


class LRs(Callback):
    "The lr of every optimiser step, read before the step"
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
    "Weights, optimiser state, scheduler and callback states equal, bit for bit"
    ca, cb = torch.load(a/'last.pt', weights_only=True), torch.load(b/'last.pt', weights_only=True)
    for k in ca['model']: assert torch.equal(ca['model'][k], cb['model'][k]), k
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]['momentum_buffer'], sb[k]['momentum_buffer']) for k in sa)
    assert ca['scheduler'] == cb['scheduler']
    assert ca.get('callbacks', {}).keys() == cb.get('callbacks', {}).keys()
    return ca, cb


# ---------------------------------------------------------------- the per-step schedule

PER_STEP = dict(TINY, epochs=3, limit_batches=3, schedule='cosine', warmup_epochs=1, sched_per_step=True)


def naive_cosine(lr, s, n, epochs, warmup):
    "Step `s`'s lr of a linear warm-up (`warmup` epochs) then a cosine, both counted in steps of `n` per epoch"
    W, T = warmup * n, (epochs - warmup) * n
    return lr * (s + 1) / (W + 1) if s < W else lr / 2 * (1 + math.cos(math.pi * (s - W) / T))


def test_every_step_of_a_run_has_the_naive_lr(tmp_path):
    lrs = LRs()
    train(**PER_STEP, run_dir=str(tmp_path/'r'), cbs=[lrs])
    lr = config_from('resnet20-digits').lr
    assert len(lrs.seen) == 9
    assert lrs.seen == pytest.approx([naive_cosine(lr, s, 3, 3, 1) for s in range(9)], rel=1e-12)


def test_per_step_milestones_fall_at_their_step():
    c = config_from('resnet20-digits', epochs=4, milestones=(1, 3), sched_per_step=True)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=c.lr); s = make_scheduler(opt, c, 5); got = []
    for _ in range(20): got.append(opt.param_groups[0]['lr']); opt.step(); s.step()
    assert got == pytest.approx([c.lr * c.gamma ** ((i >= 5) + (i >= 15)) for i in range(20)], rel=1e-12)


def test_a_resumed_per_step_run_equals_an_uninterrupted_one(tmp_path):
    "Stopped after epoch 1 (mid warm-up-then-cosine plan) and rerun: the same weights, optimiser and schedule, bit for bit"
    full = train(**PER_STEP, run_dir=str(tmp_path/'full'))
    with pytest.raises(RunInterrupted): train(**PER_STEP, run_dir=str(tmp_path/'cut'), cbs=[StopAfter(1)])
    lrs = LRs()
    cut = train(**PER_STEP, run_dir=str(tmp_path/'cut'), cbs=[lrs])
    same_checkpoints(tmp_path/'full', tmp_path/'cut')
    assert [r['lr'] for r in cut.history] == [r['lr'] for r in full.history]
    assert lrs.seen == pytest.approx([naive_cosine(0.05, s, 3, 3, 1) for s in range(3, 9)], rel=1e-12)


def test_a_longer_plan_rebuilds_the_per_step_schedule_at_the_epoch_boundary(tmp_path):
    "A 2-epoch run grown to 3: from step 2*3 on, every step has the lr of a fresh 3-epoch plan"
    kw = dict(PER_STEP, warmup_epochs=0)
    train(**(kw | {'epochs': 2}), run_dir=str(tmp_path/'grown'))
    lrs = LRs()
    grown = train(**kw, run_dir=str(tmp_path/'grown'), cbs=[lrs])
    assert lrs.seen == pytest.approx([naive_cosine(0.05, s, 3, 3, 0) for s in range(6, 9)], rel=1e-12)
    assert grown.record['plan_changes'][0]['at_epoch'] == 2
