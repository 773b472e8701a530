"""Activation and gradient recording: recorded tensors equal the submodules' outputs computed by hand and autograd's
gradients, every family records, no hook is left behind (even on errors), and BlockStatsCB logs through `train`."""
import math
import pytest
import torch
import torch.nn.functional as F
import pandas as pd
import cifar_kit
from cifar_kit.core import create_model
from cifar_kit.learner import Learner
from cifar_kit.record import record, Recording, BlockStatsCB, default_layers, plot_block_stats, STAT_COLUMNS
from cifar_kit.train import train


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def all_hooks(model):
    return [(n, k) for n, m in model.named_modules()
            for k in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks') if getattr(m, k)]


def assert_close(a, b):
    "`a` equals `b` up to float32 rounding relative to `b`'s scale (a fresh DenseNet in eval mode reaches activations of 1e5)"
    torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5 * max(1.0, b.abs().max().item()))


STAGED = ['resnet20', 'preresnet20', 'wrn16_2', 'densenet_bc_100_12', 'vgg11_bn', 'alexnet']


@pytest.mark.parametrize('name', STAGED)
def test_acts_and_grads_equal_hand_and_autograd(name):
    torch.manual_seed(0); m = create_model(name, num_classes=10).eval(); x = torch.randn(2, 3, 32, 32)
    with record(m) as rec: m(x).logsumexp(1).sum().backward()
    assert all_hooks(m) == []
    inter = m.named_intermediates(x)
    keys = [k for k in ['stem', *m.stage_names, 'features'] if inter[k].requires_grad]   # vgg's stem is an Identity on the image
    assert set(rec.grads) == {'final' if k == 'features' else k for k in keys}
    grads = dict(zip(keys, torch.autograd.grad(inter['logits'].logsumexp(1).sum(), [inter[k] for k in keys])))
    for k in ['stem', *m.stage_names, 'features']:
        n = 'final' if k == 'features' else k
        assert_close(rec.acts[n], inter[k])
        if k in grads: assert_close(rec.grads[n], grads[k])
        assert not rec.acts[n].requires_grad and rec.acts[n].grad_fn is None


def test_module_path_before_inplace_relu():
    torch.manual_seed(0); m = create_model('resnet20', num_classes=10).eval(); x = torch.randn(2, 3, 32, 32)
    with record(m, ['stage1.0.bn1']) as rec: m(x).sum().backward()
    b = m.stage1[0]; h = m.stem(x); b1 = b.bn1(b.conv1(h))
    out = m.forward_head(m.final(m.stage3(m.stage2(m.stage1[1:](b.relu(b.bn2(b.conv2(F.relu(b1))) + b.shortcut(h)))))))
    assert_close(rec.acts['stage1.0.bn1'], b1)
    assert_close(rec.grads['stage1.0.bn1'], torch.autograd.grad(out.sum(), b1)[0])
    assert (rec.acts['stage1.0.bn1'] < 0).any()


@pytest.mark.parametrize('name,size', [('resnet20', 32), ('preresnet20', 32), ('wrn16_2', 32), ('resnext29_8x64d', 32),
                                       ('densenet_bc_100_12', 32), ('vgg11_bn', 32), ('alexnet', 32), ('resnet18', 64)])
def test_every_family_records_and_leaves_no_hook(name, size):
    torch.manual_seed(0); m = create_model(name, num_classes=10); x = torch.randn(2, 3, size, size)
    with record(m) as rec, rec.counting_relus(): m(x).sum().backward()
    no_grad = {'stem'} if name.startswith('vgg') else set()   # vgg's stem is an Identity: the image, which needs no gradient
    assert set(rec.acts) == set(default_layers(m)) and set(rec.grads) == set(default_layers(m)) - no_grad
    assert all(rec.grads[n].shape == rec.acts[n].shape for n in rec.grads)
    inner = [n for n in rec.layers if n.startswith('stage') or n.startswith('layer')]
    assert all(0 < rec.frac_inactive(n) < 1 for n in inner), {n: rec.frac_inactive(n) for n in inner}
    assert all_hooks(m) == []


def test_hooks_removed_on_error_and_bad_names():
    m = create_model('resnet20', num_classes=10)
    with pytest.raises(RuntimeError, match='boom'):
        with record(m) as rec: m(torch.randn(2, 3, 32, 32)); raise RuntimeError('boom')
    assert all_hooks(m) == []
    with pytest.raises(ValueError, match='did you mean'): record(m, ['stage1.0.conv3']).__enter__()
    assert all_hooks(m) == []
    with torch.no_grad(), record(m, 'stage2') as rec: m(torch.randn(2, 3, 32, 32))
    assert list(rec.acts) == ['stage2'] and rec.grads == {}


def test_block_stats_cb_through_train(tmp_path):
    cb = BlockStatsCB(tmp_path/'stats.csv', every=2, layers=['stem', 'stage1', 'stage3.2.conv2'])
    train(recipe='resnet20-digits', epochs=2, limit_batches=3, progress='off', run_dir=str(tmp_path/'run'), cbs=[cb])
    df = pd.read_csv(tmp_path/'stats.csv')
    assert list(df.columns) == STAT_COLUMNS
    assert sorted(df.step.unique()) == [0, 2, 4] and sorted(df.epoch.unique()) == [1, 2]
    assert len(df) == 3 * 3 and df[['act_norm', 'act_rms', 'grad_norm', 'param_grad_norm']].gt(0).all().all()
    assert df.query("layer == 'stage1'").frac_inactive.between(0, 1).all() and df.query("layer == 'stage3.2.conv2'").frac_inactive.isna().all()
    assert all_hooks(cb.learn.model) == []
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    plt.close(plot_block_stats(tmp_path/'stats.csv'))


def test_block_stats_never_writes_through_a_link(tmp_path):
    "A planted link where the statistics go is refused in one line before training, and its target keeps every byte"
    (tmp_path/'victim').write_text('precious'); (tmp_path/'stats.csv').symlink_to(tmp_path/'victim')
    learn = Learner(create_model('resnet20', num_classes=10), [], cbs=[BlockStatsCB(tmp_path/'stats.csv')])
    with pytest.raises(ValueError, match=r"stats.csv is a symbolic link, not a regular file"): learn.fit(1)
    assert (tmp_path/'victim').read_text() == 'precious'


def test_block_stats_refuses_compiled_model(tmp_path):
    m = create_model('resnet20', num_classes=10)
    learn = Learner(torch.compile(m), [], cbs=[BlockStatsCB(tmp_path/'s.csv')])
    with pytest.raises(ValueError, match='compile'): learn.fit(1)
    assert all_hooks(m) == []
    with pytest.raises(ValueError, match='every'): BlockStatsCB(tmp_path/'s.csv', every=0)
