"""Knowledge distillation: the loss against a hand computation, alpha=0 is plain training bit for bit, the teacher stays
frozen and outside the optimiser, teachers load from kit and seed checkpoints, the command line, and real learning."""
import json, math
from pathlib import Path
import pytest
import torch
from torch import nn
import torch.nn.functional as F
import cifar_kit
from cifar_kit.core import create_model
from cifar_kit.learner import Learner, MetricsCB
from cifar_kit.train import train
from cifar_kit.distill import kd_loss, kd_div, DistillCB, load_teacher, distill, DISTILL_RECIPES, get_distill_recipe, recipe_config
from cifar_kit.cli import main


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_kd(s, t, y, T, alpha):
    kl = ce = 0.0
    for i in range(len(s)):
        p = [math.exp(v / T) for v in t[i].tolist()]; p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in s[i].tolist()]; q = [v / sum(q) for v in q]
        kl += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        e = [math.exp(v) for v in s[i].tolist()]; ce -= math.log(e[y[i]] / sum(e))
    return alpha * T * T * kl / len(s) + (1 - alpha) * ce / len(s)


@pytest.mark.parametrize('n,c,T,alpha', [(8, 10, 4.0, 0.9), (5, 100, 2.0, 0.5), (3, 7, 1.0, 1.0), (6, 10, 8.0, 0.0), (1, 2, 20.0, 0.3)])
def test_kd_loss_equals_hand_computation(n, c, T, alpha):
    g = torch.Generator().manual_seed(n * c)
    s, t = torch.randn(n, c, generator=g, dtype=torch.float64) * 3, torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(naive_kd(s, t, y, T, alpha), rel=1e-10)


def test_kd_div_properties():
    s, t = torch.randn(4, 100), torch.randn(4, 100)
    assert kd_div(s, s).item() == pytest.approx(0.0, abs=1e-5) and kd_div(s, t).item() > 0
    wrong = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), reduction='mean', log_target=True) * 16
    assert (kd_div(s, t) / wrong).item() == pytest.approx(100.0, rel=1e-4)      # 'mean' divides by the classes too
    assert kd_div(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def _digits8():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16; Y = torch.tensor(d.target)
    p = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[p][:1400], Y[p][:1400], X[p][1400:], Y[p][1400:]


class Feeder:
    def __init__(self, x, y, bs=64, shuffle=False): self.x, self.y, self.bs, self.shuffle, self.epoch = x, y, bs, shuffle, 0
    def set_epoch(self, e): self.epoch = e
    def __len__(self): return math.ceil(len(self.x) / self.bs)
    def __iter__(self):
        idx = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch)) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(self.x), self.bs): yield self.x[idx[i:i+self.bs]], self.y[idx[i:i+self.bs]]


def _fit(model, data, epochs, cbs=()):
    Xtr, Ytr, Xte, Yte = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return Learner(model, Feeder(Xtr, Ytr, shuffle=True), {'test': Feeder(Xte, Yte)}, opt=opt, cbs=[MetricsCB(10), *cbs]).fit(epochs)


def test_teacher_and_student_learn_on_8x8_digits_teacher_frozen():
    data = _digits8()
    mlp = lambda h: nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Dropout(0.1), nn.Linear(h, 10))
    torch.manual_seed(0); teacher = _fit(mlp(256), data, 4).model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1); learn = _fit(mlp(16), data, 4, [DistillCB(teacher, 4.0, 0.9)])
    t_acc = (teacher.eval()(data[2]).argmax(1) == data[3]).float().mean().item() * 100
    assert t_acc > 90 and learn.history[-1]['test_top1'] > 90
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in learn.opt.param_groups for p in g['params']}
    assert not opt_params & {id(p) for p in teacher.parameters()}


def test_alpha0_is_plain_training_bit_for_bit(tmp_path):
    torch.manual_seed(0); t = create_model('resnet20', num_classes=10)
    torch.save({'model': t.state_dict(), 'config': {'arch': 'resnet20', 'dataset': 'digits', 'model_kwargs': {}}}, tmp_path/'t.pt')
    kw = dict(epochs=1, limit_batches=2, deterministic=True, progress='off', seed=3)
    train(arch='resnet20', dataset='digits', run_dir=str(tmp_path/'plain'), **kw)
    rec = distill('resnet20', tmp_path/'t.pt', 'resnet20', dataset='digits', alpha=0.0, run_dir=str(tmp_path/'kd0'), **kw).record
    a, b = (torch.load(tmp_path/n/'last.pt', weights_only=True)['model'] for n in ('plain', 'kd0'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec['status'] == 'done' and json.loads((tmp_path/'kd0'/'distill.json').read_text())['alpha'] == 0.0
    # alpha > 0 does change the student
    distill('resnet20', tmp_path/'t.pt', 'resnet20', dataset='digits', alpha=0.5, run_dir=str(tmp_path/'kd5'), **kw)
    c = torch.load(tmp_path/'kd5'/'last.pt', weights_only=True)['model']
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_teacher_formats_and_errors(tmp_path):
    torch.manual_seed(0); kit = create_model('resnet20', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({'model': {'module.' + k: v for k, v in kit.state_dict().items()}, 'config': {'arch': 'resnet20', 'dataset': 'cifar10'}}, tmp_path/'kit.pt')
    assert torch.equal(load_teacher('resnet20', tmp_path/'kit.pt')(x), kit(x))
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in kit.state_dict().items()}}, tmp_path/'seed.pth.tar')
    assert torch.equal(load_teacher('resnet20', tmp_path/'seed.pth.tar', num_classes=10)(x), kit(x))
    with pytest.raises(ValueError, match="holds a 'resnet20'"): load_teacher('resnet56', tmp_path/'kit.pt')
    with pytest.raises(ValueError, match='pass num_classes'): load_teacher('resnet20', tmp_path/'seed.pth.tar')
    torch.save({'model': {'fc.weight': torch.zeros(10, 64)}, 'config': {'arch': 'resnet20', 'dataset': 'cifar10'}}, tmp_path/'bad.pt')
    with pytest.raises(ValueError, match='missing keys'): load_teacher('resnet20', tmp_path/'bad.pt')


def test_recipes_and_errors(tmp_path):
    assert set(DISTILL_RECIPES) >= {'kd-resnet56-resnet20-c100', 'kd-resnet110-resnet32-c100', 'kd-wrn40_2-wrn16_2-c100', 'kd-wrn40_2-wrn40_1-c100'}
    weights = {'kd': (0.9, 1 - 0.9, 0.0), 'fitnet': (0.0, 1.0, 100.0), 'at': (0.0, 1.0, 1000.0), 'rkd': (0.0, 1.0, 1.0)}
    for name, r in DISTILL_RECIPES.items():   # RepDistiller's schedule and, per method, its -a, -r and -b
        assert (r.T, r.epochs, r.milestones, r.lr, r.wd, r.batch_size) == (4.0, 240, (150, 180, 210), 0.05, 5e-4, 64)
        assert name.startswith(r.method + '-') and (r.alpha, r.ce_weight, r.beta) == weights[r.method]
        assert r.ref_kd_acc < r.ref_teacher_acc and (r.method != 'kd' or r.ref_student_acc < r.ref_kd_acc)
        if r.method == 'kd': create_model(r.teacher, num_classes=100); create_model(r.student, num_classes=100)
    assert sorted(n for n in DISTILL_RECIPES if n.startswith('kd-')) == sorted(n.replace('at-', 'kd-', 1) for n in DISTILL_RECIPES if n.startswith('at-'))
    # RepDistiller's README, table 1, row by row
    assert [get_distill_recipe(f'{m}-resnet110-resnet32-c100').ref_kd_acc for m in ('kd', 'fitnet', 'at', 'rkd')] == [73.08, 71.06, 72.31, 71.82]
    assert [get_distill_recipe(f'{m}-wrn40_2-wrn16_2-c100').ref_kd_acc for m in ('kd', 'fitnet', 'at', 'rkd')] == [74.92, 73.58, 74.08, 73.35]
    assert get_distill_recipe('kd-wrn40_2-wrn16_2-c100').ref_kd_acc == 74.92
    c = recipe_config('kd-resnet110-resnet32-c100', 'teacher')
    assert (c.arch, c.epochs, c.lr, c.batch_size) == ('resnet110', 240, 0.05, 64) and 'distill' in c.run_dir
    with pytest.raises(ValueError, match='did you mean'): get_distill_recipe('kd-resnet56-resnet20')
    with pytest.raises(ValueError, match='teacher-checkpoint'): distill('resnet20', None, 'resnet20', dataset='digits')


def test_cli(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save({'model': create_model('resnet20', num_classes=10).state_dict(),
                'config': {'arch': 'resnet20', 'dataset': 'digits', 'model_kwargs': {}}}, tmp_path/'t.pt')
    code = main(['distill', '--teacher', 'resnet20', '--teacher-checkpoint', str(tmp_path/'t.pt'), '--student', 'resnet20',
                 '--dataset', 'digits', '--epochs', '1', '--limit-batches', '1', '--temperature', '2', '--alpha', '0.5',
                 '--progress', 'off', '--out-dir', str(tmp_path/'run')])
    out = capsys.readouterr().out
    assert code == 0 and 'distilled from resnet20 (T=2.0, alpha=0.5)' in out
    assert json.loads((tmp_path/'run'/'distill.json').read_text())['T'] == 2.0
    assert main(['distill', '--teacher', 'resnet20', '--teacher-checkpoint', str(tmp_path/'t.pt'), '--student', 'resnet20',
                 '--dataset', 'cifar100']) == 2
    assert '10 classes' in capsys.readouterr().err


@pytest.mark.slow
def test_resnet20_teacher_and_distilled_student_learn_on_digits(tmp_path):
    torch.set_num_threads(2)
    kw = dict(epochs=6, milestones=(4,), progress='off', seed=0)
    t = train(arch='resnet20', dataset='digits', run_dir=str(tmp_path/'teacher'), **kw).record
    s = distill('resnet20', tmp_path/'teacher'/'last.pt', 'resnet20', dataset='digits', run_dir=str(tmp_path/'student'), **kw).record
    assert 100 - t['final_test_err_pct'] > 90 and 100 - s['final_test_err_pct'] > 90
