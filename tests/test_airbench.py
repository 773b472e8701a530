"""airbench's networks against the `airbench` package itself (0.1.8, the dev extra): the same parameter count, the
same initial weights from the same seed, the same function given the same weights (CPU, fp32, train and eval mode);
the whitening init against a covariance computed patch by patch; alternating flips epoch by epoch;
test-time augmentation against views built pixel by pixel, and against airbench's `infer`."""
import numpy as np
import pytest
import torch
from torch import nn
import cifar_kit  # noqa: F401  (before airbench: it imports torchvision, which needs the kit's shim on a CPU torch)
from cifar_kit.core import create_model, num_params
from cifar_kit.models.airbench import (from_airbench, init_whitening_, whitening_weights, alternating_flips,
                                       alternating_flip, tta_predict)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_net(monkeypatch):
    "airbench's own builder by name, on the CPU: its `.cuda()` call made the identity"
    try: from airbench import lib_airbench94, lib_airbench96
    except ImportError as e:
        pytest.skip(f'airbench is not importable ({e}): pip install -c constraints.txt airbench==0.1.8')
    monkeypatch.setattr(nn.Module, 'cuda', lambda self, *a, **k: self)
    return {'airbench94': lib_airbench94.make_net94, 'airbench96': lib_airbench96.make_net96}.__getitem__


def _randomize_(net, x):
    "Random weights everywhere (the frozen ones too) and BN statistics of a batch, so outputs depend on every tensor"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters(): p.normal_(0, 0.3, generator=g)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d): m.weight.uniform_(0.5, 1.5, generator=g); m.momentum = None
        net.train()(x)
    return net


@pytest.mark.parametrize('name', ['airbench94', 'airbench96'])
def test_same_parameter_count_and_frozen_parameters(name, make_net):
    ref, kit = make_net(name)().float(), create_model(name)
    assert num_params(kit) == num_params(ref) == {'airbench94': 1_972_792, 'airbench96': 12_721_208}[name]
    frozen = lambda net: {k: None for k, p in net.named_parameters() if not p.requires_grad}
    assert frozen(kit).keys() == from_airbench(frozen(ref)).keys()     # the whitening weights and every BN weight


@pytest.mark.parametrize('name', ['airbench94', 'airbench96'])
def test_same_seed_same_initial_weights(name, make_net):
    torch.manual_seed(0); ref = make_net(name)()        # airbench rounds its fresh weights to fp16
    torch.manual_seed(0); kit = create_model(name).half()
    want = from_airbench(ref.state_dict())
    assert want.keys() == kit.state_dict().keys()
    assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in kit.state_dict().items())


@pytest.mark.parametrize('name', ['airbench94', 'airbench96'])
@torch.no_grad()
def test_same_function_given_the_same_weights(name, make_net):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    ref = make_net(name)().float().to(memory_format=torch.contiguous_format)   # channels-last sums in another order
    ref = _randomize_(ref, x)
    kit = create_model(name)
    kit.load_state_dict(from_airbench(ref.state_dict()), strict=True)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(kit.eval()(x), ref.eval()(x))
    for m in [*kit.modules(), *ref.modules()]:
        if isinstance(m, nn.BatchNorm2d): m.momentum = 0.4
    torch.testing.assert_close(kit.train()(x), ref.train()(x))   # batch statistics, and the running ones they update
    # running variances reach about 60 here: float32 sums in another order differ by a few 1e-6 of that
    torch.testing.assert_close(kit.state_dict(), from_airbench(ref.state_dict()), rtol=1e-5, atol=1e-5)


def _naive_whitening(images, k=2, eps=5e-4):
    "Rows (Λ + ε)^(-1/2) Vᵀ, largest eigenvalue first, from a covariance summed patch by patch in float64"
    x = images.double().numpy()
    n, c, h, w = x.shape
    cov, count = np.zeros((c * k * k, c * k * k)), 0
    for i in range(n):
        for r in range(h - k + 1):
            for s in range(w - k + 1):
                p = x[i, :, r:r + k, s:s + k].reshape(-1)    # channel, row, column
                cov += np.outer(p, p); count += 1
    evals, evecs = np.linalg.eigh(cov / count)
    order = np.argsort(evals)[::-1]
    return evecs[:, order].T / np.sqrt(evals[order] + eps)[:, None]


@pytest.mark.parametrize('shape', [(3, 3, 6, 6), (2, 3, 5, 7)])
def test_whitening_weights_match_a_naive_eigendecomposition(shape):
    torch.manual_seed(0)
    images = torch.randn(shape) + torch.linspace(-1, 1, shape[-1])   # a mean, so the uncentred covariance matters
    w = whitening_weights(images).reshape(24, 12).numpy()
    ref = _naive_whitening(images)
    sign = np.sign((w[:12] * ref).sum(1, keepdims=True))             # an eigenvector is defined up to its sign
    np.testing.assert_allclose(w[:12] * sign, ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(w[12:], -w[:12])


def test_init_whitening_sets_the_stem_and_refuses_other_convs():
    torch.manual_seed(0)
    images, net = torch.randn(4, 3, 8, 8), create_model('airbench94')
    bias = net.stem.whiten.bias.detach().clone()
    init_whitening_(net.stem.whiten, images)
    assert torch.equal(net.stem.whiten.weight, whitening_weights(images).float())
    assert torch.equal(net.stem.whiten.bias, bias) and not net.stem.whiten.weight.requires_grad
    with pytest.raises(ValueError, match='2·C·k·k filters'): init_whitening_(net.stage1.conv1, images)
    with pytest.raises(ValueError, match='2·C·k·k filters'): init_whitening_(net.stem.whiten, images[:, :1])


def test_whitening_matches_airbench_up_to_sign():
    try: from airbench.utils import init_whitening_conv
    except ImportError as e: pytest.skip(f'airbench is not importable ({e})')
    torch.manual_seed(0)
    images = torch.randn(8, 3, 12, 12)
    ref, kit = create_model('airbench94').stem.whiten, create_model('airbench94').stem.whiten
    init_whitening_conv(ref, images); init_whitening_(kit, images)
    a, b = ref.weight.detach().reshape(24, 12), kit.weight.detach().reshape(24, 12)
    sign = torch.sign((a * b).sum(1, keepdim=True))
    torch.testing.assert_close(a * sign, b, rtol=1e-3, atol=1e-3)      # airbench's eigh runs in float32


def test_alternating_flip_alternates_exactly_and_is_fixed_by_the_seed():
    n = 1000
    order = [torch.randperm(n, generator=torch.Generator().manual_seed(e)) for e in range(6)]   # any shuffle
    by_image = torch.zeros(6, n, dtype=torch.bool)
    for e in range(6):
        for b in order[e].split(64): by_image[e, b] = alternating_flips(b, n, e, seed=7)
    assert (by_image[1:] == ~by_image[:-1]).all()                  # each image: flipped on exactly every other epoch
    assert 0 < by_image[0].sum() < n                                # epoch 0: a coin per image, not all one way
    again = torch.stack([alternating_flips(torch.arange(n), n, e, seed=7) for e in range(6)])
    assert torch.equal(again, by_image)                             # deterministic from the seed
    assert not torch.equal(alternating_flips(torch.arange(n), n, 0, seed=8), by_image[0])
    x = torch.randn(5, 3, 4, 6)
    idx = torch.tensor([3, 999, 0, 500, 42])
    got = alternating_flip(x, idx, n, 3, seed=7)
    for j, i in enumerate(idx):
        assert torch.equal(got[j], x[j].flip(-1) if by_image[3, i] else x[j])
    with pytest.raises(ValueError, match='outside'): alternating_flips(torch.tensor([n]), n, 0)
    with pytest.raises(ValueError, match='epoch'): alternating_flips(idx, n, -1)


def _shift(x, di, dj):
    "x moved by (di, dj) pixels, the uncovered border filled by reflection, built pixel by pixel"
    h, w = x.shape[-2:]
    refl = lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w): out[..., i, j] = x[..., refl(i - di, h), refl(j - dj, w)]
    return out


@torch.no_grad()
def test_tta_is_the_weighted_average_of_its_views():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6, 5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 4))     # position-sensitive: every view counts
    m = lambda v: model(v).double()
    views = {(0, 0): 1 / 4, (1, 1): 1 / 8, (-1, -1): 1 / 8}           # each view and its mirror, with this weight
    want = sum(wt * (m(_shift(x, *d)) + m(_shift(x, *d).flip(-1))) for d, wt in views.items())
    torch.testing.assert_close(tta_predict(model, x, 2).double(), want)
    torch.testing.assert_close(tta_predict(model, x, 1).double(), (m(x) + m(x.flip(-1))) / 2)
    assert torch.equal(tta_predict(model, x, 0), model(x))
    with pytest.raises(ValueError, match='TTA level'): tta_predict(model, x, 3)


@pytest.mark.parametrize('level', [0, 1, 2])
@torch.no_grad()
def test_tta_matches_airbench_infer(level):
    try: from airbench.utils import infer
    except ImportError as e: pytest.skip(f'airbench is not importable ({e})')
    torch.manual_seed(0)
    net, x = create_model('airbench94').eval(), torch.randn(3, 3, 32, 32)

    class Loader:   # what `infer` reads of airbench's loader: the images and their normalisation
        images, normalize = x, staticmethod(lambda v: v)
    torch.testing.assert_close(tta_predict(net, x, level), infer(net, Loader, level))
