"""Feature distillation (cifar_kit.instruments.feature_kd): each loss against its formula written out (float64), the
invariances that define AT and RKD, FitNets' regressor learning, RepDistiller's layers for the kit's pairs, and a digits
teacher -> student run training end to end with each method."""
import math
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from cifar_kit.core import create_model
from cifar_kit.distill import DISTILL_RECIPES
from cifar_kit.instruments.probe import measuring
from cifar_kit.instruments.feature_kd import (FEATURE_KD_METHODS, FEATURE_KD_WEIGHTS, ATLoss, FeatureKD, FitNetLoss,
                                              HintRegressor, LayerPair, RKDLoss, at_loss, attention_map, feature_pairs,
                                              rkd_angle, rkd_distance)

f64 = dict(dtype=torch.float64)


def _rand(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


# ---- the formulas, written out image by image, pair by pair ----
def at_by_hand(fs, ft, p=2):
    "mean over images and positions of (Q_s/|Q_s| - Q_t/|Q_t|)^2, Q = mean over channels of |A|^p"
    n, hw = fs.shape[0], fs.shape[2] * fs.shape[3]
    fs, ft = fs.flatten(2).tolist(), ft.flatten(2).tolist()      # n lists of C lists of HW numbers
    def q(a): return [sum(abs(ch[k]) ** p for ch in a) / len(a) for k in range(hw)]
    total = 0.
    for i in range(n):
        qs, qt = q(fs[i]), q(ft[i])
        ns, nt = math.sqrt(sum(x * x for x in qs)), math.sqrt(sum(x * x for x in qt))
        total += sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt))
    return total / (n * hw)


def rkd_by_hand(s, t):
    "RKD's distance and angle terms, by loops over pairs and triplets"
    n = len(s)
    def dist(e): return [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
    def cos(e, i, j, k):
        a, b = [x - y for x, y in zip(e[i], e[j])], [x - y for x, y in zip(e[k], e[j])]
        na, nb = math.hypot(*a), math.hypot(*b)
        return 0. if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)
    s, t = s.tolist(), t.tolist()
    ds, dt = dist(s), dist(t)
    ms, mt = sum(map(sum, ds)) / (n * (n - 1)), sum(map(sum, dt)) / (n * (n - 1))
    d = sum(huber(ds[i][j] / ms, dt[i][j] / mt) for i in range(n) for j in range(n)) / n ** 2
    a = sum(huber(cos(s, i, j, k), cos(t, i, j, k)) for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return d, a


# ---- each loss equals its formula ----
def test_at_equals_its_formula():
    fs, ft = torch.tensor([[[[1., 0], [0, 0]]]], **f64), torch.tensor([[[[0., 0], [0, 2]]]], **f64)
    assert at_loss(fs, ft).item() == 0.5                      # Q_s = (1,0,0,0), Q_t = (0,0,0,1): mean of (1,0,0,1)
    fs, ft = _rand(3, 4, 5, 5, seed=1), _rand(3, 7, 5, 5, seed=2)
    assert at_loss(fs, ft).item() == pytest.approx(at_by_hand(fs, ft), rel=1e-12)
    big = _rand(3, 7, 10, 10, seed=3)                          # the larger map is averaged down in 2 x 2 squares
    pooled = big.reshape(3, 7, 5, 2, 5, 2).mean((3, 5))
    assert at_loss(fs, big).item() == pytest.approx(at_by_hand(fs, pooled), rel=1e-12)
    both = at_by_hand(fs, ft) + at_by_hand(fs, pooled)
    assert ATLoss()([fs, fs], [ft, pooled]).item() == pytest.approx(both, rel=1e-12)
    assert ATLoss(reduction='mean')([fs, fs], [ft, ft]).item() == pytest.approx(at_by_hand(fs, ft), rel=1e-12)


def test_rkd_equals_its_formula():
    s, t = torch.tensor([[0.], [1], [2]], **f64), torch.tensor([[0.], [1], [3]], **f64)
    # distances / mean: s (1, 2, 1) / (4/3), t (1, 3, 2) / 2; differences 1/4, 0, 1/4, each pair twice: 4 * (1/32) / 9
    assert rkd_distance(s, t).item() == pytest.approx(1 / 72, rel=1e-12)
    assert rkd_angle(s, t).item() == 0                       # on a line, in the same order: the same angles
    s, t = _rand(6, 3, seed=4), 5 * _rand(6, 8, seed=5)
    d, a = rkd_by_hand(s, t)
    assert rkd_distance(s, t).item() == pytest.approx(d, rel=1e-9)
    assert rkd_angle(s, t).item() == pytest.approx(a, rel=1e-12)
    assert RKDLoss()([s], [t]).item() == pytest.approx(25 * d + 50 * a, rel=1e-9)
    assert RKDLoss(w_d=1, w_a=0)([s.reshape(6, 3, 1, 1)], [t]).item() == pytest.approx(d, rel=1e-9)   # maps flattened


def test_fitnet_equals_its_formula_and_its_regressor_learns():
    v, u = _rand(2, 3, 4, 4, seed=6), _rand(2, 5, 4, 4, seed=7)
    fit = FitNetLoss([v.shape], [u.shape]).double()
    W, gamma, beta = _rand(5, 3, seed=8), _rand(5, seed=9), _rand(5, seed=10)
    with torch.no_grad():
        fit.regressors[0].conv.weight.copy_(W[:, :, None, None]); fit.regressors[0].bn.weight.copy_(gamma)
        fit.regressors[0].bn.bias.copy_(beta)
    # training mode: BatchNorm by the batch's own mean and (biased) variance per channel, eps 1e-5, then the ReLU
    total = 0.
    z = [[[[sum(W[o, c] * v[n, c, h, w] for c in range(3)) for w in range(4)] for h in range(4)] for o in range(5)]
         for n in range(2)]
    for o in range(5):
        vals = [z[n][o][h][w] for n in range(2) for h in range(4) for w in range(4)]
        mu = sum(vals) / len(vals); var = sum((x - mu) ** 2 for x in vals) / len(vals)
        for n in range(2):
            for h in range(4):
                for w in range(4):
                    r = max(0., gamma[o] * (z[n][o][h][w] - mu) / math.sqrt(var + 1e-5) + beta[o])
                    total += (r - u[n, o, h, w]) ** 2
    loss = fit([v], [u])
    assert loss.item() == pytest.approx(float(total) / u.numel(), rel=1e-10)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fit.parameters())
    assert [p.shape for p in fit.parameters()] == [(5, 3, 1, 1), (5,), (5,)]
    assert HintRegressor((3, 8, 8), (5, 4, 4)).conv.stride == (2, 2)
    with pytest.raises(ValueError, match='twice'): HintRegressor((3, 8, 8), (5, 3, 3))


# ---- the invariances ----
def test_at_is_invariant_to_the_scale_of_the_features():
    fs, ft = _rand(4, 6, 8, 8, seed=11), _rand(4, 3, 8, 8, seed=12)
    ref = at_loss(fs, ft)
    for c in (1e-3, 0.5, 7., -2.):
        assert torch.allclose(attention_map(c * fs), attention_map(fs), rtol=0, atol=1e-14)
        assert at_loss(c * fs, ft).item() == pytest.approx(ref.item(), rel=1e-10)
        assert at_loss(fs, c * ft).item() == pytest.approx(ref.item(), rel=1e-10)
    assert at_loss(fs, 3 * fs).item() < 1e-30


def test_rkd_is_invariant_to_a_rotation_of_the_embedding():
    s, t = _rand(8, 5, seed=13), _rand(8, 12, seed=14)
    Q = torch.linalg.qr(_rand(5, 5, seed=15))[0]
    assert torch.allclose(Q @ Q.T, torch.eye(5, **f64), atol=1e-12)
    P = torch.linalg.qr(_rand(12, 12, seed=16))[0]
    ref = RKDLoss()([s], [t]).item()
    assert ref > 1e-3
    assert RKDLoss()([s @ Q.T], [t]).item() == pytest.approx(ref, rel=1e-9)
    assert RKDLoss()([s], [t @ P.T]).item() == pytest.approx(ref, rel=1e-9)
    assert RKDLoss()([3 * s @ Q.T + 2], [t]).item() == pytest.approx(ref, rel=1e-9)   # scale and shift as well
    assert RKDLoss()([t], [t @ P.T]).item() < 1e-12                   # a rotated teacher: nothing to learn


# ---- RepDistiller's layers and weights for the kit's pairs ----
def test_feature_pairs_for_the_kits_recipes():
    x = torch.randn(2, 3, 32, 32)
    for r in (r for r in DISTILL_RECIPES.values() if r.method == 'kd'):   # one recipe per pair
        t, s = create_model(r.teacher, num_classes=100), create_model(r.student, num_classes=100)
        assert feature_pairs(t, s, 'fitnet') == [LayerPair('stage2', 'stage2')]
        assert feature_pairs(t, s, 'at') == [LayerPair(f'stage{i}', f'stage{i}') for i in (1, 2, 3)]
        assert feature_pairs(t, s, 'rkd') == [LayerPair('pool', 'pool')]
        fkd = FeatureKD('fitnet', t, s, x=x)
        (reg,) = fkd.loss.regressors
        assert (reg.conv.in_channels, reg.conv.out_channels) == (s.stage2[-1].conv2.out_channels,
                                                                 t.stage2[-1].conv2.out_channels)
        assert reg.conv.kernel_size == (1, 1)
    assert FEATURE_KD_WEIGHTS == {'fitnet': 100., 'at': 1000., 'rkd': 1.}
    r20 = create_model('resnet20', num_classes=10)
    with pytest.raises(ValueError, match='one of'): FeatureKD('hint', r20, r20)
    with pytest.raises(ValueError, match='pass x='): FeatureKD('fitnet', r20, r20)
    with pytest.raises(ValueError, match='pass pairs='): feature_pairs(nn.Sequential(nn.Flatten()), r20, 'at')
    with pytest.raises(ValueError, match='5 and the student 3'):
        feature_pairs(create_model('vgg11_bn', num_classes=10), r20, 'at')
    fkd = FeatureKD('at', r20, r20, pairs=[('stage3', 'stage2')], weight=2.)
    assert fkd.pairs == [LayerPair('stage3', 'stage2')] and fkd.weight == 2.


# ---- a digits teacher, a student per method, end to end ----
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16 - 0.3).expand(-1, 3, -1, -1) / 0.45
    return X[:1024].contiguous(), torch.tensor(d.target)[:1024]


def _steps(model, X, Y, n, fkd=None, teacher=None):
    params = [*model.parameters(), *(fkd.parameters() if fkd is not None else [])]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    model.train()
    for i in range(n):
        xb, yb = X[32 * i:32 * (i + 1)], Y[32 * i:32 * (i + 1)]
        if fkd is None: loss = F.cross_entropy(model(xb), yb)
        else:
            with fkd.recording(teacher, model) as (rec_s, rec_t):
                with torch.no_grad(): teacher(xb)
                loss = F.cross_entropy(model(xb), yb)
            loss = loss + fkd(rec_s.acts, rec_t.acts)
        opt.zero_grad(); loss.backward(); opt.step()


def _feature_loss(fkd, teacher, student, x):
    "The weighted feature loss on a fixed batch, the student in training mode, its BatchNorm statistics kept"
    with torch.no_grad(), measuring(student, train=True), fkd.recording(teacher, student) as (rec_s, rec_t):
        teacher(x); student(x)
        return fkd(rec_s.acts, rec_t.acts).item()


@pytest.fixture(scope='module')
def digits_teacher():
    "The digits and a WRN-16-2 teacher trained 12 steps on them, frozen"
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        X, Y = _digits()
        torch.manual_seed(0); teacher = create_model('wrn16_2', num_classes=10)
        _steps(teacher, X, Y, 12)
    finally: torch.set_num_threads(threads)
    return X, Y, teacher.eval().requires_grad_(False)


@pytest.mark.parametrize('method', FEATURE_KD_METHODS)
def test_a_digits_student_trains_with_each_method(method, digits_teacher):
    X, Y, teacher = digits_teacher
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        torch.manual_seed(1); student = create_model('resnet20', num_classes=10)
        fkd = FeatureKD(method, teacher, student, x=X[:4])
        probe = X[-256:]
        start = _feature_loss(fkd, teacher, student, probe)
        reg0 = [p.clone() for p in fkd.parameters()]
        _steps(student, X, Y, 20, fkd, teacher)
        end = _feature_loss(fkd, teacher, student, probe)
    finally: torch.set_num_threads(threads)
    # the end-to-start ratio was 0.60 (FitNets), 0.19 (AT) and 0.48 (RKD) when this test was written
    assert math.isfinite(end) and end < 0.8 * start, (method, start, end)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(reg0, fkd.parameters()))         # FitNets' regressor trained
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*student.modules(), *teacher.modules()])


def test_the_students_features_keep_the_graph_and_survive_inplace_ops():
    "What the loss reads is the layer's output as it was, even when an inplace ReLU overwrites it afterwards"
    class Tiny(nn.Module):
        stage_names = ('stage1', 'stage2')
        def __init__(self):
            super().__init__()
            self.stem, self.stage1, self.stage2 = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
            self.pool, self.act = nn.AdaptiveAvgPool2d(1), nn.ReLU(inplace=True)
        def forward(self, x): return self.pool(self.act(self.stage2(self.act(self.stage1(self.stem(x)))))).flatten(1)
    torch.manual_seed(0); t, s = Tiny().double(), Tiny().double()
    fkd = FeatureKD('at', t, s, weight=1.)
    x = _rand(3, 1, 4, 4, seed=17)
    with fkd.recording(t, s) as (rec_s, rec_t):
        with torch.no_grad(): t(x)
        s(x)
    assert rec_s.acts['stage1'].requires_grad and (rec_s.acts['stage1'] < 0).any()
    raw_s, raw_t = s.stage1(s.stem(x)), t.stage1(t.stem(x))           # before the inplace ReLU
    assert fkd(rec_s.acts, rec_t.acts).item() == pytest.approx(
        at_by_hand(raw_s.detach(), raw_t.detach()) + at_by_hand(s.stage2(F.relu(raw_s)).detach(),
                                                                t.stage2(F.relu(raw_t)).detach()), rel=1e-12)
    fkd(rec_s.acts, rec_t.acts).backward()
    assert s.stem.weight.grad.abs().sum() > 0 and t.stem.weight.grad is None
