"""A timm user's first tries: each of timm's flags works as in timm, or is refused in one line that names the kit's way.
`--aa` in timm's grammar, a YAML `--config` and `--print-config`, `--resume` and `--initial-checkpoint`, `--opt`,
`--drop` and `--drop-path`, the `validate` command, and `pretrained=True`."""
import json, sys, urllib.error
import pytest
import torch
import cifar_kit  # noqa: F401  (first: registers the models, lets torchvision import)
from cifar_kit.cli import InitialWeightsCB, _initial_weights
from cifar_kit.config import config_from, config_dict, parse_aa
from cifar_kit.core import MODEL_CFGS, create_model
from cifar_kit.loaders import test_feeder
from cifar_kit.models.layers import DropPath
from cifar_kit.models.preresnet import PreActBasicBlock
from cli_helpers import run_cli, one_line_error

DIGITS = ('--recipe', 'resnet20-digits')


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def printed_config(capsys, *argv)->dict:
    "`cifar-kit train ARGV --print-config`: the config it prints (and it must train nothing)"
    code, out, err = run_cli(capsys, 'train', *argv, '--print-config')
    assert code == 0, err
    return json.loads(out)


# --aa: timm's RandAugment grammar
def test_aa_reads_timms_grammar_and_refuses_what_the_kit_does_not_do(capsys):
    assert parse_aa('rand-m9-n2-inc1') == parse_aa('rand-inc1-n2-m9') == parse_aa('rand-m9-n2') == \
        ('randaugment', dict(magnitude=9, num_ops=2, bins=11))
    assert parse_aa('rand-m6') == ('randaugment', dict(magnitude=6, num_ops=2, bins=11))    # timm's default: 2 ops
    assert printed_config(capsys, *DIGITS, '--aa', 'rand-m9-n2-inc1-mstd0')['aa'] == 'rand-m9-n2-inc1-mstd0'
    line = one_line_error(capsys, 'train', *DIGITS, '--aa', 'rand-m9-mstd0.5-inc1', '--print-config',
                          contains='--aa rand-m9-mstd0.5-inc1: mstd0.5 is not supported')
    assert "the kit's RandAugment takes m0..10, n1 and up, inc1, mstd0, mmax10 and p1.0" in line
    for spec, bad in (('rand-m9-inc0', 'inc0'), ('rand-m9-p0.5', 'p0.5'), ('rand-m9-mmax20', 'mmax20'),
                      ('rand-m11', 'that m or n'), ('rand-m9-tweights', "section 'tweights'")):
        one_line_error(capsys, 'train', *DIGITS, '--aa', spec, contains=bad)


# --config FILE.yaml with timm's keys, --print-config
def test_yaml_config_with_timms_keys_and_print_config_round_trip(capsys, tmp_path):
    pytest.importorskip('yaml')
    (tmp_path/'args.yaml').write_text('model: resnet20\ndataset: digits\nepochs: 3\nsched: cosine\nlr: 0.05\n'
                                      'weight_decay: 1.0e-4\nsmoothing: 0.1\nopt: momentum\namp: false\nbatch_size: 32\n'
                                      'drop: 0.2\ndrop_path: 0.1\naa: rand-m9-n2-inc1\n')
    c = printed_config(capsys, '--config', tmp_path/'args.yaml', '--seed', 3)
    want = dict(arch='resnet20', dataset='digits', epochs=3, schedule='cosine', lr=0.05, wd=1e-4, label_smoothing=0.1,
                nesterov=False, amp='off', batch_size=32, seed=3, aa='rand-m9-n2-inc1',
                model_kwargs={'drop_rate': 0.2, 'drop_path_rate': 0.1})
    assert {k: c[k] for k in want} == want
    (tmp_path/'printed.json').write_text(json.dumps(c))
    assert printed_config(capsys, '--config', tmp_path/'printed.json') == c    # what it prints is a --config file


def test_yaml_config_refusals_are_one_line(capsys, tmp_path, monkeypatch):
    pytest.importorskip('yaml')
    (tmp_path/'opt.yaml').write_text('model: resnet20\ndataset: digits\nopt: adamw\n')
    one_line_error(capsys, 'train', '--config', tmp_path/'opt.yaml', contains='--opt adamw: the kit trains with SGD only')
    (tmp_path/'eps.yaml').write_text('model: resnet20\ndataset: digits\nopt_eps: 1.0e-8\n')
    one_line_error(capsys, 'train', '--config', tmp_path/'eps.yaml', contains="unknown setting(s) ['opt_eps']")
    (tmp_path/'bad.yml').write_text('epochs: [3\n')
    one_line_error(capsys, 'train', '--config', tmp_path/'bad.yml', contains='is not valid YAML')
    monkeypatch.setitem(sys.modules, 'yaml', None)                             # PyYAML absent
    one_line_error(capsys, 'train', '--config', tmp_path/'opt.yaml', contains='reading it needs PyYAML: pip install pyyaml')


# --resume and --initial-checkpoint
def test_resume_names_the_run_folder(capsys, tmp_path):
    c = config_from('resnet20-digits', epochs=3, run_dir=str(tmp_path/'elsewhere'))
    run = tmp_path/'run'; run.mkdir(); (run/'config.json').write_text(json.dumps(config_dict(c)))
    (run/'last.pt').write_bytes(b''); (run/'best.pt').write_bytes(b'')
    for arg in (run, run/'last.pt'):
        got = printed_config(capsys, '--resume', arg)
        assert got == config_dict(c) | {'run_dir': str(run)}
    one_line_error(capsys, 'train', '--resume', run/'best.pt', contains='a run resumes from its newest checkpoint, last.pt')
    one_line_error(capsys, 'train', '--resume', tmp_path, contains=f'{tmp_path} is no run folder of the kit')
    one_line_error(capsys, 'train', '--resume', run, '--config', run/'config.json', contains='not both')


def test_initial_checkpoint_starts_a_run_from_its_weights(capsys, tmp_path):
    torch.manual_seed(123); start = create_model('resnet20', num_classes=10).state_dict()
    torch.save({'model': start}, tmp_path/'w.pt')
    # lr 1e-30: the one step moves no nonzero float32 weight, so the run's conv weights are the file's exactly
    code, _, err = run_cli(capsys, 'train', *DIGITS, '--epochs', 1, '--limit-batches', 1, '--lr', 1e-30, '--wd', 0,
                           '--device', 'cpu', '--progress', 'off', '--out-dir', tmp_path/'run',
                           '--initial-checkpoint', tmp_path/'w.pt')
    assert code == 0, err
    trained = torch.load(tmp_path/'run'/'last.pt', weights_only=True)['model']
    convs = [k for k, v in start.items() if v.ndim == 4]
    assert len(convs) == 21 and all(torch.equal(trained[k], start[k]) for k in convs)
    torch.manual_seed(0); fresh = create_model('resnet20', num_classes=10).state_dict()
    assert not torch.equal(fresh[convs[0]], start[convs[0]])
    code, out, err = run_cli(capsys, 'validate', tmp_path/'run'/'last.pt', '--device', 'cpu',   # a kit checkpoint
                             '--results-file', tmp_path/'r.json')
    assert code == 0 and out.startswith('test loss '), err
    assert json.loads((tmp_path/'r.json').read_text())['n'] == 360                  # the digits test set
    one_line_error(capsys, 'train', '--recipe', 'resnet110-c100', '--initial-checkpoint', tmp_path/'w.pt',
                   contains='holds another architecture or number of classes')    # checked before any work
    one_line_error(capsys, 'train', *DIGITS, '--initial-checkpoint', tmp_path/'none.pt', contains='no checkpoint at')


def test_initial_weights_read_safetensors_and_load_only_at_epoch_0(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1); sd = {k: v.contiguous() for k, v in create_model('resnet20').state_dict().items()}
    save_file(sd, str(tmp_path/'model.safetensors'))
    for src in (tmp_path/'model.safetensors', tmp_path):                         # the file, or an export folder
        got = _initial_weights(src)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    class Learn: pass
    learn = Learn(); learn.model = create_model('resnet20'); before = learn.model.state_dict()['fc.weight'].clone()
    cb = InitialWeightsCB(sd, 'w'); cb.learn = learn
    learn.epoch = 4; cb.before_fit()                                              # a resumed run keeps its weights
    assert torch.equal(learn.model.fc.weight, before)
    learn.epoch = 0; cb.before_fit()
    assert torch.equal(learn.model.fc.weight, sd['fc.weight'])


# --opt
def test_opt_maps_timms_sgd_names_and_refuses_the_rest(capsys):
    assert printed_config(capsys, *DIGITS, '--opt', 'sgd')['nesterov'] is True       # timm's sgd is Nesterov's
    assert printed_config(capsys, *DIGITS, '--opt', 'momentum')['nesterov'] is False
    one_line_error(capsys, 'train', *DIGITS, '--opt', 'adamw', contains='--opt adamw: the kit trains with SGD only')


# --drop and --drop-path
def test_drop_and_drop_path_add_no_tensor_and_default_off():
    torch.manual_seed(0); plain = create_model('wrn16_2')
    torch.manual_seed(0); reg = create_model('wrn16_2', drop_rate=0.3, drop_path_rate=0.2)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in reg.state_dict().items()}
    assert all(torch.equal(v, reg.state_dict()[k]) for k, v in plain.state_dict().items())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(plain.eval()(x), reg.eval()(x))        # both off in evaluation
    torch.manual_seed(5); a = plain.train()(x)
    torch.manual_seed(5); b = create_model('wrn16_2', drop_rate=0.0, drop_path_rate=0.0).train()
    b.load_state_dict(plain.state_dict()); torch.manual_seed(5)
    assert torch.equal(a, b(x))                                                   # at 0: the same pass, bit for bit


@pytest.mark.parametrize('name,blocks', [('resnet20', 9), ('preresnet20', 9), ('wrn16_2', 6), ('resnet164', 54)])
def test_drop_path_rises_linearly_over_the_blocks(name, blocks):
    with torch.device('meta'): m = create_model(name, drop_path_rate=0.5)
    assert [d.p for d in m.modules() if isinstance(d, DropPath)] == [0.5 * i / (blocks - 1) for i in range(blocks)]


def test_drop_path_drops_whole_branches_per_image():
    torch.manual_seed(0); blk = PreActBasicBlock(8, 8).train(); x = torch.randn(64, 8, 6, 6)
    branch = blk(x) - x                                                          # p = 0: branch plus identity shortcut
    blk.drop_path.p = 0.5; torch.manual_seed(1); y = blk(x)
    dropped = [i for i in range(64) if torch.equal(y[i], x[i])]
    kept = [i for i in range(64) if i not in dropped]
    assert 10 < len(dropped) < 54                                                # p = 0.5 of 64 images
    assert torch.allclose(y[kept] - x[kept], 2 * branch[kept], atol=1e-5)         # kept ones scaled by 1/(1-p)


def test_drop_flags_refused_where_the_model_has_no_such_part(capsys):
    one_line_error(capsys, 'train', '--recipe', 'densenet_bc_100_12-c10', '--drop-path', 0.1,
                   contains='DenseNetBC has no residual branches to drop')
    one_line_error(capsys, 'train', '--recipe', 'resnet18-in1k', '--drop', 0.1,
                   contains="--drop: model 'resnet18' takes no drop_rate")
    one_line_error(capsys, 'train', *DIGITS, '--drop', 1.5, contains='drop_rate is a probability in [0, 1)')
    c = printed_config(capsys, '--recipe', 'wrn28_10-c10', '--drop', 0.1, '--drop-path', 0.05)
    assert c['model_kwargs'] == {'drop': 0.3, 'drop_rate': 0.1, 'drop_path_rate': 0.05}   # the recipe's own kept


def test_drop_flags_pass_to_timms_own_models(capsys):
    pytest.importorskip('timm')
    c = printed_config(capsys, '--arch', 'timm/resnet10t', '--dataset', 'digits', '--drop', 0.1, '--drop-path', 0.05)
    assert c['model_kwargs'] == {'drop_rate': 0.1, 'drop_path_rate': 0.05}


def test_timm_builds_kit_models_with_its_regularisers():
    timm = pytest.importorskip('timm')
    from cifar_kit.hub import register_timm
    register_timm()
    m = timm.create_model('cifar_kit_resnet20', drop_rate=0.1, drop_path_rate=0.2)
    assert m.drop_rate == 0.1 and max(d.p for d in m.modules() if isinstance(d, DropPath)) == 0.2


# validate
def test_validate_scores_a_model_as_a_naive_count_does(capsys, tmp_path):
    torch.manual_seed(0); m = create_model('resnet20', num_classes=10).eval()
    torch.save(m.state_dict(), tmp_path/'sd.pt')
    code, out, err = run_cli(capsys, 'validate', '--model', 'resnet20', '--checkpoint', tmp_path/'sd.pt',
                             '--dataset', 'digits', '--device', 'cpu', '--results-file', tmp_path/'r.json')
    assert code == 0, err
    res = json.loads((tmp_path/'r.json').read_text())
    feeder, _ = test_feeder('digits', batch_size=128, device='cpu')
    with torch.no_grad(): right = sum(int((m(x).argmax(1) == y).sum()) for x, y in feeder)
    assert res['n'] == 360 and res['top1'] == pytest.approx(100 * right / 360, abs=1e-9)
    assert res['top1'] + res['top1_err'] == pytest.approx(100) and res['top5'] >= res['top1']
    assert 'top-1' in out
    one_line_error(capsys, 'validate', tmp_path/'sd.pt', '--split', 'train', contains='--split train')
    one_line_error(capsys, 'validate', '--pretrained', contains='--pretrained needs the model')
    one_line_error(capsys, 'validate', '--model', 'resnet20', '--dataset', 'digits', contains='needs weights')


# pretrained=True
def test_pretrained_true_without_published_weights_says_how_to_pass_a_folder():
    with pytest.raises(ValueError, match="no weights are published for 'resnet20'.*pretrained='FOLDER'"):
        create_model('resnet20', pretrained=True)


def test_pretrained_true_offline_names_torchvisions_url_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    def offline(*a, **k): raise urllib.error.URLError('no network')
    monkeypatch.setattr('torchvision.models._api.load_state_dict_from_url', offline)
    with pytest.raises(ValueError) as e: create_model('resnet18', pretrained=True)
    msg = str(e.value)
    assert '\n' not in msg and 'https://download.pytorch.org/models/resnet18-f37072fd.pth (URLError)' in msg
    assert f"{tmp_path}/hub/checkpoints/resnet18-f37072fd.pth is not there" in msg and "pretrained='FOLDER'" in msg


def _export(folder, arch='resnet20'):
    "A hand-made export of a fresh `arch` with 7 classes in `folder`; its state_dict"
    from safetensors.torch import save_file
    folder.mkdir(); torch.manual_seed(3); m = create_model(arch, num_classes=7)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder/'model.safetensors'))
    (folder/'config.json').write_text(json.dumps(dict(arch=arch, num_classes=7, model_kwargs={})))
    return m.state_dict()


def test_pretrained_true_resolves_a_registered_hub_id_and_hf_hub_names(monkeypatch, tmp_path):
    pytest.importorskip('huggingface_hub')
    sd = _export(tmp_path/'hub')
    asked = []
    def fake_download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename)); return str(tmp_path/'hub'/filename)
    monkeypatch.setattr('huggingface_hub.hf_hub_download', fake_download)
    monkeypatch.setitem(MODEL_CFGS['resnet20'], 'hf_hub_id', 'kit-org/resnet20-c7')
    for m in (create_model('resnet20', pretrained=True), create_model('hf-hub:kit-org/resnet20-c7', pretrained=True)):
        assert type(m).__name__ == 'ResNet' and m.num_classes == 7
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert set(asked) == {('kit-org/resnet20-c7', 'config.json'), ('kit-org/resnet20-c7', 'model.safetensors')}
    fresh = create_model('hf-hub:kit-org/resnet20-c7')                            # as timm: the model, not its weights
    assert fresh.num_classes == 7 and not torch.equal(fresh.fc.weight, sd['fc.weight'])


def test_pretrained_true_offline_names_the_hub_cache(monkeypatch, tmp_path):
    hub = pytest.importorskip('huggingface_hub')
    def offline(repo_id, filename, cache_dir=None): raise hub.errors.LocalEntryNotFoundError('offline')
    monkeypatch.setattr('huggingface_hub.hf_hub_download', offline)
    monkeypatch.setitem(MODEL_CFGS['resnet20'], 'hf_hub_id', 'kit-org/resnet20-c7')
    with pytest.raises(ValueError) as e: create_model('resnet20', pretrained=True, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert '\n' not in msg and "config.json of 'kit-org/resnet20-c7' from the Hugging Face Hub" in msg
    assert f"its cache {tmp_path} (LocalEntryNotFoundError)" in msg and "pretrained='FOLDER'" in msg

