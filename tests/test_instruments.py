"""The instruments against naive references: linear CKA and its minibatch estimator, neural collapse, the Hessian's top
eigenvalues, the gradient noise scale; and their callbacks measure on schedule, outside the steps, changing nothing."""
import pandas as pd
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from cifar_kit.core import create_model
from cifar_kit.learner import Learner
from cifar_kit.instruments import (linear_cka, hsic_unbiased, MinibatchCKA, cka_matrix, neural_collapse,
                                   top_hessian_eigenvalues, gradient_noise_scale, penultimate, measuring,
                                   CKACB, CollapseCB, SharpnessCB, NoiseScaleCB)

F64 = torch.float64


def gen(seed): return torch.Generator().manual_seed(seed)


# ---- linear CKA
def naive_hsic(K, L):
    "HSIC with the centring matrix written out: tr(KHLH) / (n - 1)^2"
    n = len(K)
    H = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def naive_cka(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return naive_hsic(K, L) / torch.sqrt(naive_hsic(K, K) * naive_hsic(L, L))


def features(seed=0, n=60):
    g = gen(seed)
    X = torch.randn(n, 7, generator=g, dtype=F64)
    Y = torch.tanh(X @ torch.randn(7, 4, generator=g, dtype=F64)) + 0.3 * torch.randn(n, 4, generator=g, dtype=F64)
    return X, Y


def test_linear_cka_equals_the_naive_hsic():
    X, Y = features()
    torch.testing.assert_close(linear_cka(X, Y), naive_cka(X, Y), rtol=0, atol=1e-12)
    torch.testing.assert_close(linear_cka(X, X), torch.tensor(1., dtype=F64), rtol=0, atol=1e-12)


def test_linear_cka_invariances():
    X, Y = features(1)
    Q = torch.linalg.qr(torch.randn(7, 7, generator=gen(2), dtype=F64))[0]
    base = linear_cka(X, Y)
    torch.testing.assert_close(linear_cka(X @ Q, Y), base, rtol=0, atol=1e-12)          # orthogonal
    torch.testing.assert_close(linear_cka(X, 0.01 * Y), base, rtol=0, atol=1e-12)       # isotropic scaling
    assert abs(linear_cka(X * torch.arange(1., 8., dtype=F64), Y) - base) > 1e-3         # not any linear map
    with pytest.raises(ValueError, match='60 rows vs 5'): linear_cka(X, Y[:5])


def test_unbiased_hsic_is_the_u_statistic():
    "Song et al.'s closed form equals the average over ordered 4-tuples of distinct indices of its kernel h"
    X, Y = features(3, n=7)
    K, L = X @ X.T, Y @ Y.T
    import itertools
    total, count = 0., 0
    for i, j, q, r in itertools.permutations(range(7), 4):
        # h(i, j, q, r) of Song et al. 2012 (Theorem 2), averaged over permutations of the four indices
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    torch.testing.assert_close(hsic_unbiased(K, L), total / count, rtol=1e-10, atol=1e-12)


def test_minibatch_cka_converges_to_the_full_cka():
    X, Y = features(4, n=300)
    full = linear_cka(X, Y)
    g, gaps = gen(5), {3: 0., 300: 0.}
    for _ in range(5):
        acc = MinibatchCKA()
        for k in range(1, 301):
            i = torch.randint(0, 300, (24,), generator=g)
            acc.update([X[i]], [Y[i]])
            if k in gaps: gaps[k] += (acc.value()[0, 0] - full).abs().item() / 5
    assert gaps[300] < gaps[3] / 3 and gaps[300] < 0.02, gaps


def test_cka_matrix_of_two_models_matches_feature_by_feature():
    torch.manual_seed(0)
    a, b = create_model('resnet20', num_classes=10), create_model('resnet20', num_classes=10)
    x = torch.randn(16, 3, 8, 8)
    cka, na, nb = cka_matrix(a, [(x, None)], b, layers_b=['stage1', 'stage3'])
    assert cka.shape == (5, 2) and nb == ['stage1', 'stage3']
    with torch.no_grad():
        fa = a.eval().named_intermediates(x)['stage2']
        fb = b.eval().named_intermediates(x)['stage3']
    acc = MinibatchCKA(); acc.update([fa], [fb])
    torch.testing.assert_close(cka[na.index('stage2'), 1], acc.value()[0, 0], rtol=0, atol=1e-12)


# ---- neural collapse
def simplex_etf(C, d, seed=0):
    U = torch.linalg.qr(torch.randn(d, C, generator=gen(seed), dtype=F64))[0]
    return (C / (C - 1)) ** 0.5 * (torch.eye(C, dtype=F64) - 1 / C) @ U.T


def test_neural_collapse_is_zero_on_a_simplex_etf_and_not_on_random_features():
    C, d = 6, 10
    means = simplex_etf(C, d)
    y = torch.arange(C).repeat(4)
    for k, v in neural_collapse(means[y], y, means).items(): assert abs(v) < 1e-10, (k, v)
    g = gen(1)
    rand = neural_collapse(torch.randn(48, d, generator=g), torch.arange(C).repeat(8), torch.randn(C, d, generator=g))
    assert all(v > 0.05 for v in rand.values()), rand


def test_neural_collapse_against_loops():
    "NC1 to NC4 from per-class loops and numpy-free explicit sums"
    g, C, d, n = gen(2), 4, 6, 40
    H, y, W, b = (torch.randn(n, d, generator=g, dtype=F64), torch.arange(C).repeat(n // C),
                  torch.randn(C, d, generator=g, dtype=F64), torch.randn(C, generator=g, dtype=F64))
    mu_g = sum(H[i] for i in range(n)) / n
    mu = torch.stack([sum(H[i] for i in range(n) if y[i] == c) / int((y == c).sum()) for c in range(C)])
    sw = sum(torch.outer(H[i] - mu[y[i]], H[i] - mu[y[i]]) for i in range(n)) / n
    sb = sum(torch.outer(mu[c] - mu_g, mu[c] - mu_g) for c in range(C)) / C
    M = torch.stack([mu[c] - mu_g for c in range(C)], 1)
    E = torch.eye(C, dtype=F64) - torch.ones(C, C, dtype=F64) / C
    ref = dict(nc1=torch.trace(sw @ torch.linalg.pinv(sb)) / C,
               nc2=torch.linalg.norm(M.T @ M / torch.linalg.norm(M.T @ M) - E / torch.linalg.norm(E)),
               nc3=torch.linalg.norm(W.T / torch.linalg.norm(W) - M / torch.linalg.norm(M)))
    disagree = 0
    for i in range(n):
        nearest = min(range(C), key=lambda c: float((H[i] - mu[c]).norm()))
        disagree += int(int((W @ H[i] + b).argmax()) != nearest)
    got = neural_collapse(H, y, W, b)
    for k, v in ref.items(): assert abs(got[k] - v.item()) < 1e-9 * max(1., abs(v.item())), (k, got[k], v)
    assert got['nc4'] == disagree / n


# ---- sharpness
def test_top_hessian_eigenvalues_of_least_squares():
    g, n, p = gen(3), 30, 7
    X, y = torch.randn(n, p, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)
    lin = nn.Linear(p, 1, bias=False).double()
    ref = torch.linalg.eigvalsh(2 * X.T @ X / n).flip(0)
    torch.testing.assert_close(top_hessian_eigenvalues(lin, F.mse_loss, (X, y), k=4), ref[:4], rtol=1e-10, atol=1e-10)
    assert all(q.grad is None for q in lin.parameters())


def test_top_hessian_eigenvalue_of_a_registered_model_is_finite_and_leaves_it_unchanged():
    torch.manual_seed(0)
    m = create_model('resnet20', num_classes=10)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with measuring(m, train=True):
        ev = top_hessian_eigenvalues(m, F.cross_entropy, (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))), k=2, iters=5)
    assert ev.shape == (2,) and ev[0] >= ev[1] and ev.isfinite().all()
    for k, v in m.state_dict().items(): assert torch.equal(v, state[k]), k


# ---- gradient noise scale
def test_gradient_noise_scale_matches_the_naive_computation():
    "ℓ(w; x) = wᵀx: each example's gradient is x, so the chunk gradients are chunk means"
    g, d, B, b = gen(4), 4, 48, 6
    A = torch.randn(d, d, generator=g, dtype=F64)
    x = torch.tensor([1., -2., 0.5, 3.], dtype=F64) + torch.randn(B, d, generator=g, dtype=F64) @ A.T
    lin = nn.Linear(d, 1, bias=False).double()
    r = gradient_noise_scale(lin, lambda out, y: out.mean(), (x, torch.zeros(B)), b)
    per_example = [x[i] for i in range(B)]                      # the gradients, one by one
    chunks = [sum(per_example[i:i + b]) / b for i in range(0, B, b)]
    g2_small = sum(float(c @ c) for c in chunks) / len(chunks)
    big = sum(per_example) / B
    g2_big = float(big @ big)
    g2 = (B * g2_big - b * g2_small) / (B - b)
    trace = (g2_small - g2_big) / (1 / b - 1 / B)
    for k, v in dict(g2_small=g2_small, g2_big=g2_big, g2=g2, trace=trace, b_simple=trace / g2).items():
        assert abs(r[k] - v) < 1e-10 * max(1., abs(v)), (k, r[k], v)
    assert (r['b_small'], r['b_big']) == (b, B)
    with pytest.raises(ValueError, match='multiple of b_small=5'):
        gradient_noise_scale(lin, lambda out, y: out.mean(), (x, torch.zeros(B)), 5)


# ---- the callbacks
STEP_EVENTS = ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'after_step', 'after_batch')


def tiny_run(tmp_path, cbs, seed=0):
    torch.manual_seed(seed)
    model = create_model('resnet20', num_classes=4)
    g = gen(seed)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    dls = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    learn = Learner(model, dls, {'valid': [(x[:16], y[:16])]}, cbs=cbs,
                    opt=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    learn.fit(3)
    return model


def test_callbacks_measure_on_schedule_and_change_nothing(tmp_path):
    cbs = [CKACB(tmp_path/'cka.csv', every=2), CollapseCB(tmp_path/'nc.csv', every=2),
           SharpnessCB(tmp_path/'sharp.csv', every=2, k=2, iters=4), NoiseScaleCB(tmp_path/'noise.csv', every=2, b_small=4)]
    for cb in cbs: assert not any(e in type(cb).__dict__ or hasattr(cb, e) for e in STEP_EVENTS), type(cb).__name__
    measured = tiny_run(tmp_path, cbs)
    plain = tiny_run(tmp_path, [])
    for (k, v), w in zip(measured.state_dict().items(), plain.state_dict().values()): assert torch.equal(v, w), k
    for name in ('cka', 'nc', 'sharp', 'noise'):
        assert sorted(set(pd.read_csv(tmp_path/f'{name}.csv').epoch)) == [0, 2, 3], name   # start, every 2nd, the last
    cka = pd.read_csv(tmp_path/'cka.csv')
    assert list(cka.layer[:5]) == ['stem', 'stage1', 'stage2', 'stage3', 'final']
    assert (cka[cka.epoch == 0].cka_init - 1).abs().max() < 1e-9
    sharp = pd.read_csv(tmp_path/'sharp.csv')
    assert (sharp.threshold - (2 + 2 * 0.9) / 0.05).abs().max() < 1e-6 and (sharp.eig1 >= sharp.eig2).all()
    assert set(pd.read_csv(tmp_path/'noise.csv').b_big) == {16}


def test_cka_callback_keeps_its_start_across_a_resume(tmp_path):
    cb = CKACB(tmp_path/'cka.csv')
    tiny_run(tmp_path, [cb])
    again = CKACB(tmp_path/'cka2.csv')
    again.load_state_dict(cb.state_dict())
    assert again.first.keys() == cb.first.keys()
    for k in cb.first: assert torch.equal(again.first[k], cb.first[k])


def test_collapse_callback_uses_the_models_classifier(tmp_path):
    torch.manual_seed(0)
    m = create_model('resnet20', num_classes=4).eval()
    x, y = torch.randn(12, 3, 8, 8), torch.arange(4).repeat(3)
    cb = CollapseCB(tmp_path/'nc.csv')
    row = cb.measure(m, x, y)[0]
    with torch.no_grad(): h, out = penultimate(m, x)
    ref = neural_collapse(h, y, m.fc.weight, m.fc.bias)
    assert {k: row[k] for k in ref} == ref
    assert row['top1'] == 100 * (out.argmax(1) == y).float().mean().item()
