"""The run folder's files: one module writes and reads them, one function loads weights from any checkpoint, and a run
can be read back whole (`load_run`), with honest provenance and a history file fit for people."""
import json, platform, subprocess, sys
from pathlib import Path
import pytest
import torch
from cifar_kit import callbacks
import cifar_kit.run as run_wing
from cifar_kit.run import files as run_files
from cifar_kit.core import create_model
from cifar_kit.learner import Callback
from cifar_kit.run.files import load_weights, load_checkpoint_file, read_history, write_history, git_commit, device_name, CheckpointError, WeightsMismatchError
from cifar_kit.train import train, load_run, Run, evaluate_checkpoint
from cifar_kit.distill import load_teacher
from cifar_kit.models.seed import load_seed_checkpoint

TINY = dict(recipe='resnet20-digits', limit_batches=1, deterministic=True, progress='off', eval_batch_size=512, device='cpu')


def test_callbacks_module_holds_only_callbacks():
    plain = {'AMP_DTYPES', 'progress_mode', 'epoch_line', 'DivergedError', 'plot_history', 'plot_runs'}
    others = [n for n in callbacks.__all__ if n not in plain and not (isinstance(getattr(callbacks, n), type) and issubclass(getattr(callbacks, n), Callback))]
    assert others == [], others
    for name in ('atomic_write', 'load_checkpoint_file', 'strip_prefixes', 'load_weights', 'rng_state', 'write_history', 'read_history',
                 'run_record', 'versions', 'git_commit', 'device_name', 'checkpoint_state', 'save_keeping_previous', 'RunLock', 'RunInterrupted'):
        assert name in run_wing.__all__, name


def _wrapped(sd, prefix): return {prefix + k: v for k, v in sd.items()}


def test_one_loader_for_every_format_and_every_caller(tmp_path):
    torch.manual_seed(0); ref = create_model('resnet20', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): want = ref(x)
    sd = ref.state_dict()
    kit = {'model': _wrapped(sd, 'module._orig_mod.'), 'config': {'arch': 'resnet20', 'dataset': 'cifar10', 'model_kwargs': {}}}
    seed = {'epoch': 3, 'state_dict': _wrapped(sd, 'module.'), 'acc': torch.tensor(50.0)}
    torch.save(kit, tmp_path/'kit.pt'); torch.save(seed, tmp_path/'seed.pth.tar'); torch.save(sd, tmp_path/'bare.pt')
    for src in (kit, seed, sd, tmp_path/'kit.pt', tmp_path/'seed.pth.tar', str(tmp_path/'bare.pt')):
        with torch.no_grad(): assert torch.equal(load_weights(create_model('resnet20', num_classes=10).eval(), src)(x), want)
    for m in (load_teacher('resnet20', tmp_path/'kit.pt'), load_teacher('resnet20', tmp_path/'seed.pth.tar', num_classes=10),
              load_teacher('resnet20', tmp_path/'bare.pt', num_classes=10), load_seed_checkpoint(tmp_path/'seed.pth.tar', 'resnet20')[0]):
        with torch.no_grad(): assert torch.equal(m(x), want)
    # errors: one line, the file named, the fix given
    with pytest.raises(WeightsMismatchError, match=r'another architecture .* 1 missing keys') as e:
        load_weights(create_model('resnet20', num_classes=10), {k: v for k, v in list(sd.items())[1:]})
    assert '\n' not in str(e.value)
    with pytest.raises(CheckpointError, match='bare.pt is not a seed checkpoint'): load_weights(create_model('resnet20'), tmp_path/'bare.pt', seed_format=True)
    with pytest.raises(CheckpointError, match='holds no model weights'): load_weights(create_model('resnet20'), {'epoch': 1})


def test_load_run_gives_back_what_train_returned(tmp_path):
    run = train(**TINY, epochs=2, val_size=200, run_dir=str(tmp_path/'r'))
    assert isinstance(run, Run) and run.record['status'] == 'done' and run.record['best_valid_epoch'] in (1, 2)
    back = load_run(tmp_path/'r')
    assert (back.config, back.record, back.run_dir) == (run.config, run.record, run.run_dir)
    assert [r['epoch'] for r in back.history] == [1, 2]
    for a, b in zip(back.history, run.history):      # the file's rounding, not another run
        assert a['test_top1'] == pytest.approx(b['test_top1'], abs=1e-3) and a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    assert back.checkpoint.name == 'best.pt'           # validation chose the epoch
    best = torch.load(tmp_path/'r'/'best.pt', weights_only=True)['model']
    assert all(torch.equal(v, best[k]) for k, v in back.model.state_dict().items()) and not back.model.training
    r = evaluate_checkpoint(tmp_path/'r'/'last.pt', device='cpu')
    assert r['err_pct'] == pytest.approx(run.record['final_test_err_pct'], abs=1e-3)
    # a rerun of the finished run returns the same Run without training
    again = train(**TINY, epochs=2, val_size=200, run_dir=str(tmp_path/'r'))
    assert again.record == run.record and again.config == run.config


def test_history_file_is_rounded_with_units(tmp_path):
    h = [{'epoch': 1, 'lr': 0.0499876543210123, 'train_loss': 2.30258509299, 'train_top1': 11.11111111, 'test_loss': 2.2,
          'test_top1': 12.3456789, 'test_top5': 51.0, 'seconds': 1.234567, 'train_images': 1437}]
    write_history(h, tmp_path/'history.csv')
    head, row = (tmp_path/'history.csv').read_text().splitlines()
    assert head == 'epoch,lr,train_loss,train_top1_pct,test_loss,test_top1_pct,test_top5_pct,seconds,train_images'
    assert row == '1,0.049987654,2.30259,11.111,2.2,12.346,51.0,1.235,1437'
    back = read_history(tmp_path/'history.csv')[0]
    assert back['epoch'] == 1 and isinstance(back['epoch'], int) and back['test_top1'] == 12.346 and 'test_top1_pct' not in back


def _git(*a, cwd): subprocess.run(['git', *a], cwd=cwd, check=True, capture_output=True)


def test_git_commit_is_the_kits_own_checkout_only(tmp_path):
    own = tmp_path/'checkout'; (own/'cifar_kit').mkdir(parents=True); (own/'cifar_kit'/'core.py').write_text('x = 1\n')
    _git('init', '-q', cwd=own); _git('add', '-A', cwd=own)
    _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'x', cwd=own)
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=own, capture_output=True, text=True).stdout.strip()
    assert git_commit(own/'cifar_kit') == {'commit': head, 'dirty': False}
    (own/'cifar_kit'/'core.py').write_text('x = 2\n')
    assert git_commit(own/'cifar_kit') == {'commit': head, 'dirty': True}
    venv = own/'venv'/'lib'/'site-packages'/'cifar_kit'; venv.mkdir(parents=True)   # installed inside some repository
    assert git_commit(venv) == {'commit': '', 'dirty': None}
    assert git_commit(tmp_path) == {'commit': '', 'dirty': None}


def test_device_name_says_more_than_the_architecture():
    name = device_name('cpu')
    assert name and isinstance(name, str)
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.exists() and 'model name' in cpuinfo.read_text():
        assert name != platform.machine() and name in cpuinfo.read_text()


LOG = r'''
import sys
from cifar_kit.train import train
train(recipe='resnet20-digits', epochs=2, limit_batches=1, eval_batch_size=512, device='cpu', progress='batch', run_dir=sys.argv[1])
'''


def test_progress_in_a_log_file_is_one_line_per_epoch(tmp_path):
    p = subprocess.run([sys.executable, '-c', LOG, str(tmp_path/'r')], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for stream in (p.stdout, p.stderr): assert '\r' not in stream and '\x1b' not in stream, stream[-500:]
    lines = [l for l in p.stdout.splitlines() if l.startswith('epoch ')]
    assert [l.split()[1] for l in lines] == ['1/2', '2/2'], p.stdout
    assert 'train_loss' in lines[0] and 'test_top1' in lines[0] and lines[0].endswith(' s')


def test_runfiles_sits_low_enough_for_the_seed_loader():
    "run.files imports no kit module but core and run.disk below it (so models.seed can use its loader), and models.seed imports it"
    import ast, cifar_kit.models.seed as seed
    tree = ast.parse(Path(run_files.__file__).read_text())
    kit = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    kit |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith('cifar_kit')}
    assert kit <= {'core', 'disk'}, kit
    assert seed.load_weights is run_files.load_weights and seed.load_checkpoint_file is run_files.load_checkpoint_file
