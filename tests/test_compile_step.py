"""`--compile --compile-mode step` reaches `train`: the run compiles the whole step (`WholeStepCB`), not the model, and
the other modes compile the model as before. The compiled step itself is checked in nbs/20_learner.ipynb and, at the
fast path's size, by `make gpu-check`'s `compile_step` (its dry mode is a slow test: dynamo takes ~30 CPU s)."""
import torch
from cifar_kit.config import config_from
from cifar_kit.learner import WholeStepCB
from cifar_kit.train import build_callbacks, setup


def _cbs(tmp, **kw):
    c = config_from('resnet20-digits', **kw)
    return [type(cb) for cb in build_callbacks(c, tmp, 10, None, torch.device('cpu'))]   # writes nothing yet


def test_step_mode_adds_the_whole_step_callback_and_leaves_the_model_eager(tmp_path):
    assert WholeStepCB in _cbs(tmp_path, compile=True, compile_mode='step')
    assert WholeStepCB not in _cbs(tmp_path, compile=True) and WholeStepCB not in _cbs(tmp_path, compile_mode='step')   # needs --compile
    s = setup(config_from(arch='resnet20', dataset='digits8', compile=True, compile_mode='step', device='cpu'))
    assert not hasattr(s['model'], '_orig_mod')    # eager: WholeStepCB compiles the step around it
    s = setup(config_from(arch='resnet20', dataset='digits8', compile=True, device='cpu'))
    assert hasattr(s['model'], '_orig_mod')        # the default mode compiles the model (lazily: no work yet)


def test_cli_takes_the_step_mode(capsys):
    import json
    from cifar_kit.cli import main
    main(['train', '--recipe', 'resnet20-digits', '--compile', '--compile-mode', 'step', '--print-config'])
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg['compile'], cfg['compile_mode']) == (True, 'step')
