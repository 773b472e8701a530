"""Every registered model against the seed: it trains, it has the seed's parameter count and weight names, and a seed
checkpoint computes the same function in the kit's model. Generic over the registry, the oracle and `seed_reference`."""
import argparse, gzip, importlib, json, pkgutil
from pathlib import Path
import pytest
import torch
import cifar_kit, cifar_kit.models
from cifar_kit.core import list_models, create_model, model_cfg, num_params

for _m in pkgutil.iter_modules(cifar_kit.models.__path__): importlib.import_module(f'cifar_kit.models.{_m.name}')
from cifar_kit.models.seed import convert_seed_state_dict, load_seed_checkpoint
from cifar_kit.models.resnet import ResNet
from cifar_kit.models.preresnet import PreResNet
from cifar_kit.models.wrn import WideResNet
from cifar_kit.models.resnext import ResNeXt
import seed_reference

ORACLE = json.load(gzip.open(Path(__file__).parent/'data'/'seed_state_dicts.json.gz'))
BUILDERS = {name: b for info in pkgutil.iter_modules(seed_reference.__path__)
            for name, b in getattr(importlib.import_module(f'seed_reference.{info.name}'), 'BUILDERS', {}).items()}
HEAVY = set()   # names to mark slow; none needed so far: with one thread the whole file runs in about 70 s on 2 cores
slow_if_heavy = lambda names: [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny batches gain little from intra-op threads, and spinning threads stall badly on a busy machine"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def oracle_model(entry:str, device='meta'):
    "The kit model for oracle entry 'name@classes' (skipped while its family is not registered yet)"
    name, nc = entry.split('@')
    if name not in cifar_kit.MODELS: pytest.skip(f'{name} is not registered yet')
    with torch.device(device): return create_model(name, num_classes=int(nc))


def input_for(name:str, n:int=2)->torch.Tensor:
    return torch.randn(n, *model_cfg(name)['input_size'])


@pytest.mark.parametrize('name', list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    out = model(input_for(name))
    assert out.shape[0] == 2 and out.ndim == 2 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f'parameters without a finite gradient: {no_grad[:5]}'


@pytest.mark.parametrize('entry', list(ORACLE))
def test_param_count_matches_seed(entry):
    assert num_params(oracle_model(entry)) == ORACLE[entry]['num_params']


@pytest.mark.parametrize('entry', list(ORACLE))
def test_seed_names_load_strictly(entry):
    model = oracle_model(entry)
    sd = {'module.' + k: torch.empty(s, device='meta') for k, s in ORACLE[entry]['state_dict']}
    model.load_state_dict(convert_seed_state_dict(sd, model), strict=True, assign=True)


def _randomize_(model, x):
    "Random BN affine parameters, and running statistics measured on `x`, so eval outputs depend on every tensor"
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=g); m.bias.normal_(0, 0.1, generator=g)
            m.reset_running_stats(); m.momentum = None      # running stats = the stats of the batch below
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize('name', slow_if_heavy(sorted(BUILDERS)))
def test_seed_checkpoint_same_function(name, tmp_path):
    if name not in cifar_kit.MODELS: pytest.skip(f'{name} is not registered yet')
    nc = next((int(k.split('@')[1]) for k in ORACLE if k.split('@')[0] == name), 10)
    torch.manual_seed(0)
    ref = _randomize_(BUILDERS[name](nc), input_for(name, 4))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()},
                'acc': torch.tensor(91.5), 'best_acc': torch.tensor(92.0), 'optimizer': opt.state_dict()}, tmp_path/'ckpt.pth.tar')
    model, info = load_seed_checkpoint(tmp_path/'ckpt.pth.tar', name, num_classes=nc)
    assert (info['epoch'], info['best_acc'], info['num_classes']) == (3, 92.0, nc)
    x = input_for(name)
    with torch.no_grad(): got, want = model.eval()(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))   # relative to the logits' scale


def test_bad_name_suggests_close_matches():
    with pytest.raises(ValueError, match='did you mean.*resnet110'): create_model('resnet-110')
    with pytest.raises(ValueError, match='did you mean.*wrn28_10'): create_model('wrn_28_10')


@pytest.mark.parametrize('build, match', [
    (lambda: ResNet(111), r'ResNet depth must be 6n\+2 for basic blocks .* or 9n\+2 for bottleneck blocks .*got 111'),
    (lambda: ResNet(20, block='BasicBlock'), "use 'basic' or 'bottleneck'"),
    (lambda: ResNet(20, shortcut='C'), "use 'A'"),
    (lambda: PreResNet(100), r'PreResNet depth must be 6n\+2'),
    (lambda: PreResNet(29), "valid with block='bottleneck'"),
    (lambda: WideResNet(27, 10), r'WRN depth must be 6n\+4'),
    (lambda: WideResNet(28, 0), 'k must be a positive integer'),
    (lambda: WideResNet(28, 10, drop=1.0), r'in \[0, 1\)'),
    (lambda: ResNeXt(28), r'ResNeXt depth must be 9n\+2'),
    (lambda: ResNeXt(29, cardinality=0), 'cardinality must be a positive integer'),
])
def test_bad_arguments_fail_up_front(build, match):
    with pytest.raises(ValueError, match=match): build()


def test_shortcut_a_is_the_papers_resnet20():
    assert num_params(ResNet(20, shortcut='A')) == 269_722 and num_params(ResNet(20)) == 272_474


def test_seed_checkpoint_errors(tmp_path):
    ref = BUILDERS['resnet164'](10)
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, tmp_path/'r164.pth')
    with pytest.raises(ValueError, match=r"load_seed_checkpoint\(path, 'resnet164', num_classes=10\).*164-layer"):
        load_seed_checkpoint(tmp_path/'r164.pth', 'resnet110')
    with pytest.raises(ValueError, match='another shape'): load_seed_checkpoint(tmp_path/'r164.pth', 'resnet164', num_classes=100)
    torch.save(ref.state_dict(), tmp_path/'bare.pth')
    with pytest.raises(ValueError, match='not a seed checkpoint'): load_seed_checkpoint(tmp_path/'bare.pth', 'resnet164')
    torch.save({'state_dict': {}, 'args': argparse.Namespace(lr=0.1)}, tmp_path/'pickled.pth')
    with pytest.raises(ValueError, match='weights_only.*argparse.Namespace'): load_seed_checkpoint(tmp_path/'pickled.pth', 'resnet20')
