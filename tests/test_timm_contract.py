"""Every model family follows timm's feature contract: `forward_intermediates`, `feature_info`, `num_features`,
`forward_features`/`forward_head`, the classifier API, and the keywords timm passes to every factory."""
import importlib, pkgutil
import pytest
import torch
from torch import nn
import cifar_kit, cifar_kit.models
from cifar_kit.core import MODELS, list_models, create_model, model_cfg

for _m in pkgutil.iter_modules(cifar_kit.models.__path__): importlib.import_module(f'cifar_kit.models.{_m.name}')
from cifar_kit.models.layers import FeatureMixin, feature_indices
from cifar_kit.models.resnext import ResNeXt
from cifar_kit.models.densenet import DenseNetBC
from cifar_kit.models.imagenet import ImageNetResNeXt
import torchvision.models as tvm

# one small net per family: (label, builder, input size); the registered big ones share these classes
FAMILIES = [
    ('resnet', lambda: create_model('resnet20'), 32),
    ('resnet-bottleneck', lambda: create_model('resnet164'), 32),
    ('preresnet', lambda: create_model('preresnet20'), 32),
    ('wrn', lambda: create_model('wrn16_2', drop=0.3), 32),
    ('resnext', lambda: ResNeXt(depth=11, cardinality=2, base_width=4), 32),
    ('densenet_bc', lambda: DenseNetBC(depth=16, k=4), 32),
    ('vgg', lambda: create_model('vgg11_bn'), 32),
    ('alexnet', lambda: create_model('alexnet'), 32),
    ('imagenet-resnext', lambda: ImageNetResNeXt(50, cardinality=2, base_width=4), 64),
    ('torchvision-resnet', lambda: create_model('resnet18'), 64),
    ('airbench', lambda: create_model('airbench94'), 32),
]
IDS = [f[0] for f in FAMILIES]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module', params=FAMILIES, ids=IDS)
def net(request):
    "(model in eval mode with random BN statistics, input)"
    _, build, size = request.param
    torch.manual_seed(0); m = build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.modules.batchnorm._BatchNorm):
                b.running_mean.normal_(0, 0.1, generator=g); b.running_var.uniform_(0.5, 1.5, generator=g)
    return m.eval(), torch.randn(2, 3, size, size, generator=g)


def test_every_registered_class_is_covered():
    with torch.device('meta'): kinds = {type(create_model(n)) for n in list_models()}
    covered = {type(build()) for _, build, _ in FAMILIES}
    assert kinds <= covered, f'families without a contract test: {sorted(k.__name__ for k in kinds - covered)}'
    assert all(issubclass(k, FeatureMixin) for k in kinds)


@torch.no_grad()
def test_features_head_and_forward_agree(net):
    m, x = net
    f = m.forward_features(x)
    assert torch.equal(m.forward_head(f), m(x))
    final, maps = m.forward_intermediates(x)
    assert torch.equal(final, f)
    pre = m.forward_head(f, pre_logits=True)
    assert pre.shape == (2, m.num_features) and f.shape[1] == m.num_features
    assert torch.equal(m.fc(pre), m(x))


@torch.no_grad()
def test_intermediates_match_feature_info(net):
    m, x = net
    maps = m.forward_intermediates(x, intermediates_only=True)
    info = m.feature_info
    assert len(maps) == len(info) >= 3
    assert [(t.shape[1], x.shape[-1] // t.shape[-1]) for t in maps] == [(i['num_chs'], i['reduction']) for i in info]
    assert [i['reduction'] for i in info] == sorted(i['reduction'] for i in info)
    modules = dict(m.named_modules())
    assert all(i['module'] in modules for i in info)   # hooks can find every feature
    assert info[-1]['num_chs'] == m.num_features


@torch.no_grad()
def test_indices_stop_early_and_norm(net):
    m, x = net
    n = len(m.feature_info)
    final, maps = m.forward_intermediates(x)
    two = m.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(two) == 2 and all(torch.equal(a, b) for a, b in zip(two, maps[-2:]))
    picked = m.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)   # network order, as timm
    assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[-1])
    early, first = m.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(early, maps[1]) and torch.equal(first[0], maps[1])
    normed = m.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert torch.equal(normed[0], final)
    with pytest.raises(ValueError, match=f'0 to {n-1}'): m.forward_intermediates(x, indices=[n])
    with pytest.raises(ValueError, match='NCHW'): m.forward_intermediates(x, output_fmt='NLC')


@torch.no_grad()
def test_reset_classifier(net):
    m, x = net
    m = _copy(m)
    nf = m.num_features
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.num_classes == 7 and m.get_classifier().out_features == 7
    assert m.get_classifier() is getattr(m, m.get_classifier(name_only=True))
    m.reset_classifier(0)
    assert m.num_classes == 0 and torch.equal(m(x), m.forward_head(m.forward_features(x), pre_logits=True))
    assert m(x).shape == (2, nf)
    m.reset_classifier(0, '')
    assert torch.equal(m(x), m.forward_features(x))
    with pytest.raises(ValueError, match='num_classes=0'): m.reset_classifier(3)
    m.reset_classifier(3, 'max')
    assert m(x).shape == (2, 3)


@torch.no_grad()
def test_prune_intermediate_layers(net):
    m, x = net
    maps = m.forward_intermediates(x, intermediates_only=True)
    p = _copy(m)
    assert p.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
    assert torch.equal(p(x), maps[1])            # head gone: the last kept map comes out
    assert len(p.feature_info) == len(maps)      # features keep their positions
    kept = p.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, maps[:2]))
    assert sum(q.numel() for q in p.parameters()) < sum(q.numel() for q in m.parameters())


def test_measuring_changes_nothing():
    torch.manual_seed(0); m = create_model('wrn16_2', drop=0.3).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert [i['num_chs'] for i in m.feature_info] == [16, 32, 64, 128]
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize('name', ['resnet20', 'wrn16_2', 'densenet_bc_100_12', 'vgg11', 'alexnet', 'resnext50_32x4d', 'resnet18'])
def test_factories_take_timm_keywords(name):
    with torch.device('meta'):
        plain = create_model(name, num_classes=5)
        timm_style = MODELS[name](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, num_classes=5)
    assert type(plain) is type(timm_style)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in timm_style.state_dict().items()}
    with pytest.raises(ValueError, match='pretrained=False'): MODELS[name](pretrained=True)
    with pytest.raises(ValueError, match='pretrained=False'): create_model(name, pretrained='weights.safetensors')


def test_factory_with_timm_keywords_builds_the_same_weights():
    torch.manual_seed(0); a = create_model('resnet20')
    torch.manual_seed(0); b = MODELS['resnet20'](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@torch.no_grad()
def test_torchvision_weights_load_and_outputs_match():
    torch.manual_seed(0); tv = tvm.resnet18(weights=None).eval()
    kit = create_model('resnet18').eval()
    kit.load_state_dict(tv.state_dict())                 # strict
    assert list(kit.state_dict()) == list(tv.state_dict())
    assert isinstance(kit, tvm.ResNet) and not hasattr(kit, 'stage_names')   # torchvision's class, torchvision's names
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(kit(x), tv(x))
    assert [i['module'] for i in kit.feature_info] == ['relu', 'layer1', 'layer2', 'layer3', 'layer4']


def test_feature_indices_reads_indices_as_timm():
    assert feature_indices(5) == ([0, 1, 2, 3, 4], 4)
    assert feature_indices(5, 3) == ([2, 3, 4], 4)
    assert feature_indices(5, (0, -2)) == ([0, 3], 3)
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError): feature_indices(5, bad)


@torch.no_grad()
def test_same_form_as_timm():
    "With timm installed, a kit model and timm's resnet18 return intermediates in the same form"
    timm = pytest.importorskip('timm')
    t = timm.create_model('resnet18', pretrained=False, num_classes=10).eval()
    k = create_model('resnet18', num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    (tf, tmaps), (kf, kmaps) = t.forward_intermediates(x), k.forward_intermediates(x)
    assert [m.shape for m in tmaps] == [m.shape for m in kmaps] and tf.shape == kf.shape
    strip = lambda info: [(i['num_chs'], i['reduction']) for i in info]
    assert strip(t.feature_info) == strip(k.feature_info)
    assert t.num_features == k.num_features and t.forward_head(tf, pre_logits=True).shape == k.forward_head(kf, pre_logits=True).shape


@torch.no_grad()
def test_timm_feature_getter_wraps_a_kit_model():
    "timm's `FeatureGetterNet` (what `features_only=True` builds for modern timm models) prunes a kit model and reads its maps"
    pytest.importorskip('timm')
    from timm.models._features import FeatureGetterNet
    torch.manual_seed(0); m = create_model('wrn16_2').eval(); x = torch.randn(2, 3, 32, 32)
    want = m.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    f = FeatureGetterNet(m, out_indices=(1, 2, 3))
    assert f.feature_info.channels() == [32, 64, 128] and f.feature_info.reduction() == [1, 2, 4]
    assert all(torch.equal(a, b) for a, b in zip(f(x), want))


def test_feature_info_hands_out_copies():
    m = create_model('resnet20')
    m.feature_info[0]['index'] = 0            # as timm's FeatureInfo does to the dicts it is given
    assert 'index' not in m.feature_info[0]


def _copy(m):
    import copy
    return copy.deepcopy(m)
