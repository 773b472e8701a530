"""Weights to share: export then `pretrained=` gives the checkpoint's outputs exactly; torch.hub from the local checkout;
torchvision's weights; the timm bridge both ways (a timm model trains in the kit, the kit's models in timm)."""
import json, shutil
from pathlib import Path
import pytest
import torch
import cifar_kit
from cifar_kit.core import create_model
from cifar_kit.cli import main
from cifar_kit.hub import export, register_timm
from cifar_kit.run.files import load_checkpoint_file
from cifar_kit.config import config_from
from cifar_kit.train import train, load_run

ROOT = Path(cifar_kit.__file__).parent.parent
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A tiny finished digits run (one epoch of two batches)"
    d = tmp_path_factory.mktemp('hub') / 'run'
    return train(config_from('resnet20-digits', epochs=1, limit_batches=2, device='cpu', progress='off', run_dir=str(d)))


@pytest.fixture(scope='module')
def shared(run, tmp_path_factory):
    return export(run.run_dir, tmp_path_factory.mktemp('hub') / 'shared')


def _out(model, x=X):
    with torch.no_grad(): return model.eval()(x)


def test_export_then_pretrained_gives_the_checkpoints_outputs(run, shared):
    assert sorted(p.name for p in shared.iterdir()) == ['config.json', 'model.safetensors']
    cfg = json.loads((shared / 'config.json').read_text())
    assert (cfg['arch'], cfg['num_classes'], cfg['model_kwargs'], cfg['weights']) == ('resnet20', 10, {}, 'raw')
    assert cfg['run']['recipe'] == 'resnet20-digits' and cfg['run']['status'] == 'done'
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32] and len(cfg['mean']) == len(cfg['std']) == 3
    assert torch.equal(_out(create_model('resnet20', pretrained=shared)), _out(load_run(run.run_dir).model))
    assert torch.equal(_out(create_model('resnet20', pretrained=str(shared / 'model.safetensors'))), _out(run.model))


def test_export_takes_the_ema_when_the_run_keeps_one(run, tmp_path):
    "An EMA saved as AveragedModel saves it ('module.' keys, a counter) is what 'auto' exports; 'raw' the trained weights"
    copy = tmp_path / 'run'; shutil.copytree(run.run_dir, copy)
    ckpt = load_checkpoint_file(copy / 'last.pt')
    avg = torch.optim.swa_utils.AveragedModel(create_model('resnet20'), use_buffers=True)   # fresh weights: unlike the run's
    ckpt['ema'] = avg.state_dict(); torch.save(ckpt, copy / 'last.pt')
    assert json.loads((export(copy, tmp_path / 'ema') / 'config.json').read_text())['weights'] == 'ema'
    assert torch.equal(_out(create_model('resnet20', pretrained=tmp_path / 'ema')), _out(avg.module))
    export(copy, tmp_path / 'raw', weights='raw')
    assert torch.equal(_out(create_model('resnet20', pretrained=tmp_path / 'raw')), _out(run.model))


def test_refusals_are_one_line(run, shared, tmp_path, capsys):
    with pytest.raises(ValueError, match="holds weights of 'resnet20', not 'resnet32'"): create_model('resnet32', pretrained=shared)
    with pytest.raises(ValueError, match='no exported weights'): create_model('resnet20', pretrained=tmp_path)
    with pytest.raises(ValueError, match='the run folder itself'): export(run.run_dir, run.run_dir)
    assert main(['export', str(tmp_path), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds no run' in err and not (tmp_path / 'out').exists()
    assert main(['export', str(run.run_dir), str(tmp_path / 'out')]) == 0 and (tmp_path / 'out' / 'model.safetensors').is_file()


def test_a_hub_id_downloads_through_huggingface_hub(run, shared, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip('huggingface_hub')
    asked = []
    def download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename)); (tmp_path / 'cache').mkdir(exist_ok=True)
        return str(shutil.copy(shared / filename, tmp_path / 'cache' / filename))
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    assert torch.equal(_out(create_model('resnet20', pretrained='hf-hub:someone/resnet20-digits')), _out(run.model))
    assert asked == [('someone/resnet20-digits', 'config.json'), ('someone/resnet20-digits', 'model.safetensors')]


def test_torch_hub_loads_from_the_local_checkout(run, shared):
    import runpy
    hubconf = runpy.run_path(str(ROOT / 'hubconf.py'))   # what torch.hub offers: the file's public callables
    names = [n for n, v in hubconf.items() if callable(v) and not n.startswith('_')]
    assert {'wrn28_10', 'resnet20', 'densenet_bc_100_12'} <= set(names) and len(names) == len(cifar_kit.MODELS)
    assert torch.equal(_out(torch.hub.load(str(ROOT), 'resnet20', source='local', pretrained=str(shared))), _out(run.model))
    assert torch.hub.load(str(ROOT), 'wrn16_2', source='local', num_classes=100).num_classes == 100


def test_torchvision_weights_load(tmp_path, monkeypatch):
    import torchvision.models as tvm
    torch.manual_seed(0); tv = tvm.resnet18().eval()
    torch.save(tv.state_dict(), tmp_path / 'r18.pth')
    monkeypatch.setattr(tvm.WeightsEnum, 'get_state_dict', lambda self, *a, **k: torch.load(tmp_path / 'r18.pth', weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_out(create_model('resnet18', pretrained='torchvision'), x), _out(tv, x))
    assert torch.equal(_out(create_model('resnet18', pretrained=tvm.ResNet18_Weights.IMAGENET1K_V1), x), _out(tv, x))
    with pytest.raises(ValueError, match='ResNet18_Weights'): create_model('resnet18', pretrained=tvm.ResNet34_Weights.DEFAULT)


def test_a_timm_model_trains_a_digits_epoch_in_the_kit(tmp_path):
    pytest.importorskip('timm')
    r = train(config_from(arch='timm/resnet10t', dataset='digits', epochs=1, limit_batches=3, batch_size=32, device='cpu',
                          progress='off', run_dir=str(tmp_path / 'run')))
    assert r.record['status'] == 'done' and r.record['arch'] == 'timm/resnet10t' and len(r.history) == 1
    assert torch.isfinite(torch.tensor(r.history[0]['train_loss']))
    m = load_run(tmp_path / 'run').model
    assert type(m).__module__ == 'timm.models.resnet' and m.num_classes == 10
    assert main(['export', str(tmp_path / 'run'), str(tmp_path / 'shared')]) == 0   # and shares like any run
    assert torch.equal(_out(create_model('timm/resnet10t', pretrained=tmp_path / 'shared')), _out(m))


def test_a_kit_model_and_a_timm_model_give_intermediates_in_the_same_form():
    pytest.importorskip('timm')
    for m in (create_model('resnet20'), create_model('timm/resnet10t', num_classes=10)):
        with torch.no_grad():
            final, maps = m.eval().forward_intermediates(X)
            only = m.forward_intermediates(X, indices=2, intermediates_only=True)
        assert isinstance(final, torch.Tensor) and final.ndim == 4 and isinstance(maps, list)
        assert [t.shape[1] for t in maps] == [i['num_chs'] for i in m.feature_info]
        assert [X.shape[-1] // t.shape[-1] for t in maps] == [i['reduction'] for i in m.feature_info]
        assert isinstance(only, list) and len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, maps[-2:]))
        assert m.forward_head(final).shape == (4, 10)


def test_the_kits_models_in_timm_create_model(shared, run):
    timm = pytest.importorskip('timm')
    names = register_timm()
    assert 'cifar_kit_wrn28_10' in names and set(timm.list_models(module='cifar_kit_timm')) == set(names)
    assert type(timm.create_model('resnet18')).__module__ == 'timm.models.resnet'   # timm's own names stay timm's
    m = timm.create_model('cifar_kit_resnet20', pretrained=True, pretrained_cfg_overlay=dict(file=str(shared / 'model.safetensors')))
    assert torch.equal(_out(m), _out(run.model))
    assert torch.equal(_out(timm.create_model(f'local-dir:{shared}', pretrained=True)), _out(run.model))   # timm reads config.json
    assert m.pretrained_cfg['input_size'] == (3, 32, 32) and timm.data.resolve_data_config({}, model=m)['mean'] == cifar_kit.CIFAR_MEAN
    f = timm.create_model('cifar_kit_resnet20', features_only=True, out_indices=(1, 2))
    with torch.no_grad(): maps = f.eval()(X)
    assert type(f).__name__ == 'FeatureGetterNet' and [t.shape[1] for t in maps] == f.feature_info.channels() == [16, 32]
