"""`distill(method=...)` for KD, FitNets, AT and RKD: each trains end to end on the 8×8 digits and its training loss is
γ·CE + α·KD + β·feature loss written out by hand; FitNets' regressor is in the optimiser, follows the student's learning
rate, trains and is checkpointed; an interrupted feature run resumes to the bits of an uninterrupted one; a bad method
and --compile with a feature method are refused in one line before any work."""
import copy, json
import pytest
import torch
import torch.nn.functional as F
from cifar_kit.learner import Callback, CancelFitException
from cifar_kit.record import record
from cifar_kit.distill import distill, kd_div, FeatureDistillCB
from cifar_kit.cli import main
from run_helpers import snapshot

# the student learns the 8×8 digits (cheap); its teacher is conftest's `done_run`, one batch of resnet20 on the digits
KW = dict(dataset='digits8', epochs=1, limit_batches=2, deterministic=True, progress='off', eval_batch_size=512,
          device='cpu', seed=0)
# RepDistiller's CIFAR-100 commands: (γ on the cross-entropy, α on Hinton's KD, β on the feature loss)
WEIGHTS = {'kd': (1 - 0.9, 0.9, 0.0), 'fitnet': (1.0, 0.0, 100.0), 'at': (1.0, 0.0, 1000.0), 'rkd': (1.0, 0.0, 1.0)}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def teacher(done_run):
    return done_run/'last.pt'


def _attention(a):
    "Zagoruyko and Komodakis' map, written out: the channel mean of A², flattened, divided by its L2 norm"
    q = a.pow(2).mean(1).flatten(1)
    return q / q.pow(2).sum(1, keepdim=True).sqrt()


def _rkd(s, t):
    "Park et al.'s distance-wise (×25) and angle-wise (×50) Huber losses, from torch.cdist and explicit unit vectors"
    def dist(e):
        d = torch.cdist(e, e); n = len(e)
        return d / (d.sum() / (n * (n - 1)))
    def angles(e):
        u = e[None, :, :] - e[:, None, :]
        u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return torch.einsum('jid,jkd->jik', u, u)
    s, t = s.flatten(1), t.flatten(1)
    return 25 * F.smooth_l1_loss(dist(s), dist(t)) + 50 * F.smooth_l1_loss(angles(s), angles(t))


def _by_hand(method, cb, model, teacher, x, y):
    "The loss of a training batch by definition, on copies of the student and of FitNets' regressor"
    gamma, alpha, beta = WEIGHTS[method]
    layers = {'fitnet': ['stage2'], 'at': ['stage1', 'stage2', 'stage3'], 'rkd': ['pool'], 'kd': []}[method]
    s = copy.deepcopy(model).train()   # a copy: its BatchNorm statistics move, the student's must not twice
    with torch.no_grad(), record(s, layers, grads=False) as rs, record(teacher, layers, grads=False) as rt:
        zs, zt = s(x), teacher(x)
        feat = torch.zeros(())
        if method == 'fitnet':
            reg = copy.deepcopy(cb.fkd.loss.regressors[0]).train()
            feat = F.mse_loss(reg(rs.acts['stage2']), rt.acts['stage2'])
        if method == 'at': feat = sum((_attention(rs.acts[n]) - _attention(rt.acts[n])).pow(2).mean() for n in layers)
        if method == 'rkd': feat = _rkd(rs.acts['pool'], rt.acts['pool'])
        return (gamma * F.cross_entropy(zs, y) + alpha * kd_div(zs, zt) + beta * feat).item(), (beta * feat).item()


class LossCheck(Callback):
    "On each training batch, right after the distillation callback (-8): its loss, the loss by hand, β·feature loss"
    order = -7
    def __init__(self, method): self.method, self.rows = method, []
    def after_loss(self):
        learn = self.learn
        if not learn.training: return
        cb = next(c for c in learn.cbs if hasattr(c, 'teacher'))
        self.rows.append((learn.loss.item(), *_by_hand(self.method, cb, learn.model, cb.teacher, learn.xb, learn.yb)))


@pytest.mark.parametrize('method', list(WEIGHTS))
def test_each_method_trains_on_its_loss_written_by_hand(teacher, tmp_path, method):
    check = LossCheck(method)
    rec = distill('resnet20', teacher, 'resnet20', method=method, cbs=[check], run_dir=str(tmp_path/'run'), **KW).record
    assert rec['status'] == 'done' and rec['epochs'] == 1
    d = json.loads((tmp_path/'run'/'distill.json').read_text())
    assert (d['method'], d['ce_weight'], d['alpha'], d['beta']) == (method, *WEIGHTS[method]) and rec['distill'] == d
    assert len(check.rows) == 2
    for got, want, feat in check.rows:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (method, got, want)
        assert (feat > 1e-3 * want) == (method != 'kd'), (method, feat, want)   # the feature term weighs in, or is 0


class Watch(Callback):
    "Per step: the student's and the regressor's learning rates; at the start, the regressor's group and weights"
    order = 50
    def __init__(self): self.lrs, self.cb = [], None
    def before_fit(self):
        self.cb = next(c for c in self.learn.cbs if isinstance(c, FeatureDistillCB))
        self.group = self.learn.opt.param_groups[-1]
        self.start = [p.detach().clone() for p in self.cb.fkd.parameters()]
    def after_step(self): self.lrs.append((self.learn.opt.param_groups[0]['lr'], self.group['lr']))


def test_fitnets_regressor_is_in_the_optimiser_trains_and_is_checkpointed(teacher, tmp_path):
    w = Watch()
    kw = KW | dict(epochs=3, schedule='cosine', warmup_epochs=1)   # no scheduler knows the regressor's group
    distill('resnet20', teacher, 'resnet20', method='fitnet', cbs=[w], run_dir=str(tmp_path/'run'), **kw)
    reg = list(w.cb.fkd.parameters())
    assert [id(p) for p in w.group['params']] == [id(p) for p in reg] and len(reg) == 3   # conv weight, BN weight, bias
    assert (w.group['weight_decay'], w.group['momentum']) == (5e-4, 0.9)
    assert all(a == b for a, b in w.lrs)   # one schedule for both groups: lr 0.1, halved by the warm-up, then a cosine
    assert [a for a, _ in w.lrs] == pytest.approx([0.05] * 2 + [0.1] * 2 + [0.05] * 2, abs=1e-12)
    assert all(not torch.equal(a, b) for a, b in zip(w.start, reg))
    ckpt = torch.load(tmp_path/'run'/'last.pt', weights_only=True)
    saved = ckpt['callbacks']['feature_kd']
    now = w.cb.fkd.state_dict()
    assert set(saved) == set(now) and all(torch.equal(v, now[k]) for k, v in saved.items())
    student, regressor = (g['params'] for g in ckpt['optimizer']['param_groups'])   # two groups, the regressor's last
    assert regressor == [len(student) + i for i in range(3)]
    assert all(i in ckpt['optimizer']['state'] for i in regressor)   # its momentum, restored on resume


class StopAfterFirstEpoch(Callback):
    "Ends the fit at the start of epoch 2: its checkpoint of epoch 1 is written"
    def before_epoch(self):
        if self.learn.epoch == 1: raise CancelFitException()


def test_an_interrupted_feature_run_resumes_to_the_bits_of_an_uninterrupted_one(teacher, tmp_path):
    method = 'fitnet'   # the one with a state: the regressor, its optimiser group and its schedule
    kw = KW | dict(epochs=2, method=method)
    distill('resnet20', teacher, 'resnet20', run_dir=str(tmp_path/'straight'), **kw)
    first = distill('resnet20', teacher, 'resnet20', cbs=[StopAfterFirstEpoch()], run_dir=str(tmp_path/'resumed'), **kw)
    assert first.record['status'] == 'interrupted'
    assert distill('resnet20', teacher, 'resnet20', run_dir=str(tmp_path/'resumed'), **kw).record['status'] == 'done'
    a, b = (torch.load(tmp_path/n/'last.pt', weights_only=True) for n in ('straight', 'resumed'))
    assert a['epoch'] == b['epoch'] == 2
    for sa, sb in ((a['model'], b['model']), (a['callbacks']['feature_kd'], b['callbacks']['feature_kd'])):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]['momentum_buffer'], sb[i]['momentum_buffer']) for i in sa)
    # another method in the same folder: refused, nothing written
    before = snapshot(tmp_path/'resumed')
    with pytest.raises(ValueError, match=f"holds a different distillation \\(method: '{method}' -> 'at'"):
        distill('resnet20', teacher, 'resnet20', run_dir=str(tmp_path/'resumed'), **(kw | dict(method='at')))
    assert snapshot(tmp_path/'resumed') == before


@pytest.mark.parametrize('argv, says', [
    (['--method', 'hint'], "cifar-kit distill: error: --method must be one of kd, fitnet, at, rkd; got 'hint'"),
    (['--method', 'fitnet', '--compile'], "cifar-kit distill: error: --compile with --method fitnet: its features are "
     "read through hooks, which a compiled graph skips; drop --compile, or use --method kd"),
    (['--recipe', 'kd-resnet56-resnet20-c100', '--method', 'at'], "cifar-kit distill: error: recipe "
     "'kd-resnet56-resnet20-c100' distils by kd, not at: pass --recipe at-resnet56-resnet20-c100"),
])
def test_bad_method_and_compile_with_a_feature_method_are_refused_in_one_line(capsys, tmp_path, teacher, argv, says):
    out = tmp_path/'run'
    code = main(['distill', *argv, '--teacher', 'resnet20', '--teacher-checkpoint', str(teacher),
                 '--student', 'resnet20', '--dataset', 'digits8', '--out-dir', str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == says, err
    assert not out.exists()   # before any work


def test_the_recipes_listing_shows_every_method(capsys):
    assert main(['distill', '--list-recipes']) == 0
    out = capsys.readouterr().out
    for name, acc in [('kd-resnet56-resnet20-c100', '70.66'), ('fitnet-resnet56-resnet20-c100', '69.21'),
                      ('at-wrn40_2-wrn40_1-c100', '72.77'), ('rkd-resnet110-resnet32-c100', '71.82')]:
        line = next(l for l in out.splitlines() if l.startswith(name + ' '))
        assert line.split()[1] == name.split('-')[0] and line.split()[-1] == acc, line
