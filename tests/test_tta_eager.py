"""Flip TTA evaluates the eager module of a compiled model, as `Learner._forward` does (tiny model, CPU)."""
import torch
import torch.nn.functional as F
from torch import nn
from cifar_kit.learner import Learner, MetricsCB, Sums, eval_sums
from cifar_kit.callbacks import TTACB


class Compiled(nn.Module):
    "`torch.compile(model)`'s shape: the eager module as `_orig_mod`; its own forward refuses eval mode"
    def __init__(self, m): super().__init__(); self._orig_mod = m
    def forward(self, x):
        if not self.training: raise RuntimeError('the compiled graph ran in eval mode')
        return self._orig_mod(x)


def test_tta_mirror_pass_runs_the_eager_module():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4, generator=g), torch.randint(3, (40,), generator=g)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    learn = Learner(Compiled(eager), batches, {'test': batches}, loss_func=F.cross_entropy, cbs=[MetricsCB(3), TTACB()])
    learn.fit(1)
    want = eval_sums(eager, batches, Sums(3), F.cross_entropy, tta=True).read()
    assert {k: learn.history[-1][f'test_{k}'] for k in ('loss', 'top1')} == {k: want[k] for k in ('loss', 'top1')}
