"""Reliability battery: bad input, damaged files, crashes and divergence lose nothing and explain themselves.

Every user-facing failure gives one line (exit status 2 from the CLI, a specific exception from the API) before any long
work starts, and nothing already written is lost.
"""
import io, json, os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch
import cifar_kit
from cli_helpers import run_cli, one_line_error
from cifar_kit.learner import Callback
from cifar_kit.run.files import CheckpointError, load_checkpoint_file
from cifar_kit.data.registry import DatasetError
from cifar_kit.data.readers import write_fake_cifar, write_fake_imagefolder
from cifar_kit.train import train, evaluate_checkpoint
from cifar_kit.config import config_from
from cifar_kit.models.resnet import ResNet
from cifar_kit.models.preresnet import PreResNet
from cifar_kit.models.wrn import WideResNet
from cifar_kit.models.resnext import ResNeXt
from cifar_kit.models.densenet import DenseNetBC
from cifar_kit.models.vgg import VGG

QUICK = dict(recipe='resnet20-digits', limit_batches=2, deterministic=True, progress='off', eval_batch_size=512)





@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    "A finished 1-epoch digits run to evaluate and damage"
    d = tmp_path_factory.mktemp('digits') / 'run'
    train(**QUICK, epochs=1, run_dir=str(d))
    return d


# ---------------------------------------------------------------- names, values, data

@pytest.mark.parametrize('argv, contains', [
    (['train', '--arch', 'resnet-110', '--dataset', 'cifar10'], "did you mean resnet110"),
    (['train', '--recipe', 'wrn28-10-c10'], "did you mean wrn28_10-c10"),
    (['train', '--arch', 'resnet20', '--dataset', 'cifar-10'], "unknown dataset 'cifar-10'"),
    (['train', '--recipe', 'resnet164-c10', '--epochs', '0'], "epochs must be a positive integer"),
    (['train', '--recipe', 'resnet164-c10', '--epochs', '-3'], "epochs must be a positive integer"),
    (['train', '--recipe', 'resnet164-c10', '--batch-size', '0'], "batch_size must be a positive integer"),
    (['train', '--recipe', 'resnet164-c10', '--batch-size', '-64'], "batch_size must be a positive integer"),
    (['train', '--recipe', 'resnet164-c10', '--lr', 'nan'], "lr must be a finite number"),
    (['train', '--recipe', 'resnet164-c10', '--lr', 'inf'], "lr must be a finite number"),
    (['train', '--recipe', 'resnet164-c10', '--lr', '0'], "lr must be positive"),
    (['train', '--recipe', 'resnet164-c10', '--amp', 'fp8'], "amp must be one of"),
    (['train', '--recipe', 'resnet164-c10', '--device', 'tpu'], "unknown device"),
    (['models', 'zzz*'], None),
])
def test_bad_names_and_values(capsys, argv, contains):
    if contains is None:   # an empty listing is not an error
        code, out, _ = run_cli(capsys, *argv); assert code == 0 and out == ''
    else: one_line_error(capsys, *argv, contains=contains)


@pytest.mark.parametrize('build, rule', [
    (lambda: ResNet(depth=111), '6n+2'),
    (lambda: ResNet(depth=32, block='bottleneck'), '9n+2'),
    (lambda: ResNet(depth=20, block='triple'), 'block'),
    (lambda: PreResNet(depth=21), '6n+2'),
    (lambda: WideResNet(depth=27, k=10), '6n+4'),
    (lambda: WideResNet(depth=28, k=0), 'k'),
    (lambda: ResNeXt(depth=30), '9n+2'),
    (lambda: ResNeXt(depth=29, cardinality=0), 'cardinality'),
    (lambda: DenseNetBC(depth=101, k=12), '6n+4'),
    (lambda: DenseNetBC(depth=100, k=0), 'k'),
    (lambda: VGG(depth=12), '11, 13, 16'),
])
def test_bad_architecture_arguments(build, rule):
    with pytest.raises(ValueError) as e: build()
    assert rule in str(e.value) and '\n' not in str(e.value)


def test_missing_data_folder(capsys, tmp_path):
    msg = one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', tmp_path/'nowhere',
                         '--out-dir', tmp_path/'run', contains='does not exist')
    assert str(tmp_path/'nowhere') in msg and 'download' in msg
    assert not (tmp_path/'run'/'config.json').exists()        # nothing started


def test_wrongly_laid_out_imagenet_folder(tmp_path):
    (tmp_path/'flat').mkdir()
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        train(config_from('resnet18-in1k', data_dir=str(tmp_path/'flat'), run_dir=str(tmp_path/'run'), progress='off'))
    assert 'train' in str(e.value) and 'val' in str(e.value)


def test_corrupt_data_file(capsys, tmp_path):
    folder = write_fake_cifar(tmp_path, n=8)
    (folder/'data_batch_2').write_bytes((folder/'data_batch_2').read_bytes()[:300])
    msg = one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', tmp_path,
                         '--out-dir', tmp_path/'run', contains='data_batch_2')
    assert 'corrupt' in msg


def test_num_classes_mismatch(capsys, digits_run):
    one_line_error(capsys, 'eval', '--checkpoint', digits_run/'last.pt', '--dataset', 'cifar100', contains='cannot be evaluated on cifar100')


# ---------------------------------------------------------------- checkpoints

def test_truncated_checkpoint(capsys, digits_run, tmp_path):
    bad = tmp_path/'bad.pt'; bad.write_bytes((digits_run/'last.pt').read_bytes()[:5000])
    one_line_error(capsys, 'eval', '--checkpoint', bad, contains='truncated or corrupt')


def test_unsafe_pickle_is_refused(capsys, tmp_path):
    import argparse
    torch.save({'state_dict': {}, 'args': argparse.Namespace(lr=0.1)}, tmp_path/'unsafe.pt')
    one_line_error(capsys, 'eval', '--checkpoint', tmp_path/'unsafe.pt', contains='needs more than plain data')
    one_line_error(capsys, 'eval', '--checkpoint', tmp_path/'unsafe.pt', '--seed-format', '--arch', 'resnet20', '--dataset', 'cifar10',
                   contains='weights_only')


def test_checkpoint_of_another_architecture(capsys, digits_run, tmp_path):
    sd = {'module.' + k: v for k, v in cifar_kit.create_model('resnet20').state_dict().items()}
    torch.save({'state_dict': sd, 'epoch': 3, 'acc': 50.0, 'best_acc': 50.0, 'optimizer': {}}, tmp_path/'seed.pth.tar')
    write_fake_cifar(tmp_path, n=4)
    one_line_error(capsys, 'eval', '--checkpoint', tmp_path/'seed.pth.tar', '--seed-format', '--arch', 'resnet32',
                   '--dataset', 'cifar10', '--data-dir', tmp_path, contains='resnet32')
    one_line_error(capsys, 'eval', '--checkpoint', digits_run/'last.pt', '--seed-format', '--arch', 'resnet20',
                   '--dataset', 'cifar10', '--data-dir', tmp_path, contains='not a seed checkpoint')
    code, out, err = run_cli(capsys, 'eval', '--checkpoint', tmp_path/'seed.pth.tar', '--seed-format', '--arch', 'resnet20',
                         '--dataset', 'cifar10', '--data-dir', tmp_path)
    assert code == 0 and 'top-1' in out, err


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'module._orig_mod.'])
def test_wrapped_model_keys_are_accepted(digits_run, tmp_path, prefix):
    ckpt = load_checkpoint_file(digits_run/'last.pt')
    ckpt['model'] = {prefix + k: v for k, v in ckpt['model'].items()}
    torch.save(ckpt, tmp_path/'wrapped.pt')
    a, b = evaluate_checkpoint(tmp_path/'wrapped.pt', device='cpu'), evaluate_checkpoint(digits_run/'last.pt', device='cpu')
    assert a == b


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, capsys):
    ref = train(**QUICK, epochs=3, run_dir=str(tmp_path/'ref')).record
    run = tmp_path/'run'
    train(**QUICK, epochs=2, run_dir=str(run))
    prev = (run/'last.pt.prev').read_bytes()
    (run/'last.pt').write_bytes((run/'last.pt').read_bytes()[:2000])       # damaged after it was written
    capsys.readouterr()
    rec = train(**QUICK, epochs=3, run_dir=str(run)).record
    out = capsys.readouterr().out
    assert 'set aside as last.pt.corrupt' in out and f'resuming {run} at epoch 2' in out, out   # from epoch 1's copy, not from scratch
    assert rec['status'] == 'done' and rec['epochs'] == 3
    assert (run/'last.pt.corrupt').exists()                                # set aside, not deleted
    a, b = torch.load(run/'last.pt', weights_only=True), torch.load(tmp_path/'ref'/'last.pt', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert [r['epoch'] for r in a['history']] == [1, 2, 3]
    assert ref['final_test_err_pct'] == rec['final_test_err_pct']
    assert torch.load(io.BytesIO(prev), weights_only=True)['epoch'] == 1   # the copy it resumed from


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path/'run'
    train(**QUICK, epochs=1, run_dir=str(run))
    good = (run/'last.pt').read_bytes()
    real_save = torch.save
    def disk_full(obj, f, *a, **kw):       # writes part of the file, then the disk is full
        f.write(b'PK\x03\x04 partial'); raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointError) as e: train(**QUICK, epochs=2, run_dir=str(run))
    monkeypatch.setattr(torch, 'save', real_save)
    assert 'previous checkpoint is intact' in str(e.value)
    assert (run/'last.pt').read_bytes() == good
    assert torch.load(run/'last.pt', weights_only=True)['epoch'] == 1
    rec = json.loads((run/'run.json').read_text())
    assert rec['status'] == 'failed' and 'No space left' in rec['error']
    assert train(**QUICK, epochs=2, run_dir=str(run)).record['status'] == 'done'     # space back: the same call resumes


# ---------------------------------------------------------------- divergence

class PoisonLoss(Callback):
    "Makes the training loss NaN at (0-based) `epoch`, `step`"
    order = -10
    def __init__(self, epoch, step): self.epoch, self.step = epoch, step
    def after_loss(self):
        if self.learn.training and (self.learn.epoch, self.learn.iter) == (self.epoch, self.step):
            self.learn.loss = self.learn.loss * float('inf')


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path/'run'
    with pytest.raises(Exception) as e: train(**QUICK, epochs=3, run_dir=str(run), cbs=[PoisonLoss(1, 1)])
    assert 'epoch 2, step 2' in str(e.value)
    rec = json.loads((run/'run.json').read_text())
    assert rec['status'] == 'diverged' and 'epoch 2, step 2' in rec['error'] and rec['epochs'] == 1
    ckpt = torch.load(run/'last.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def test_divergence_through_the_cli(capsys, tmp_path):
    msg = one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'digits', '--lr', '1e30', '--epochs', '1', '--batch-size', '512',
                         '--progress', 'off', '--out-dir', tmp_path/'run', contains='diverged')
    assert 'epoch 1, step' in msg
    assert json.loads((tmp_path/'run'/'run.json').read_text())['status'] == 'diverged'


# ---------------------------------------------------------------- crashes

# The child process kills itself at a point reached by progress, never by wall time, so the test means the same on any
# machine. KILL_AT names the point, counted from the child's own start:
#   batch:K         before the K-th training batch's step
#   save:K          inside the K-th torch.save, after half of its bytes reached the temporary file (a torn write)
#   replace:NAME:K  just before the K-th os.replace onto NAME, i.e. after the temporary file was written and fsynced
WORKER = r"""
import os, sys, signal
import torch
kind, *arg = os.environ.get('KILL_AT', 'none').split(':')
count, seen = int(arg[-1]) if arg else 0, [0]

def hit():
    seen[0] += 1
    if seen[0] == count: os.kill(os.getpid(), signal.SIGKILL)

if kind == 'save':
    _save = torch.save
    def torn_save(obj, f, *a, **kw):
        if seen[0] + 1 == count:
            import io; buf = io.BytesIO(); _save(obj, buf, *a, **kw)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
        hit(); return _save(obj, f, *a, **kw)
    torch.save = torn_save
if kind == 'replace':
    _replace = os.replace
    def replace(src, dst, *a, **kw):
        if os.path.basename(dst) == arg[0]: hit()
        return _replace(src, dst, *a, **kw)
    os.replace = replace

from cifar_kit.learner import Callback
from cifar_kit.train import train

class KillAtBatch(Callback):
    def after_backward(self):
        if kind == 'batch' and self.learn.training: hit()

class DrawNoise(Callback):
    "Scale each loss by a draw from torch's global generator, so the weights also depend on the restored random state"
    def after_loss(self):
        if self.learn.training: self.learn.loss = self.learn.loss * (1 + 0.1 * torch.rand(()))

train(recipe='resnet20-digits', epochs=4, limit_batches=3, deterministic=True, progress='off', eval_batch_size=512,
      run_dir=sys.argv[1], cbs=[KillAtBatch(), DrawNoise()])
"""

# (where the child kills itself, what the run folder holds afterwards), in order; each resumed child starts counting anew
KILLS = [
    ('batch:2',                 lambda d: not (d/'last.pt').exists()),                   # epoch 1, mid-way: nothing saved yet
    ('save:1',                  lambda d: any(d.glob('*.last.pt.new.*.tmp'))),            # epoch 1's checkpoint torn mid-write
    ('replace:last.pt.new:1',   lambda d: any(d.glob('*.last.pt.new.*.tmp')) and not (d/'last.pt').exists()),   # written, not renamed
    ('replace:last.pt:2',       lambda d: (d/'last.pt.prev').exists() and (d/'last.pt.new').exists() and not (d/'last.pt').exists()),
    ('replace:last.pt.prev:1',  lambda d: (d/'last.pt').exists() and (d/'last.pt.new').exists()),                   # before rotating
    ('replace:history.csv:1',   lambda d: any(d.glob('*.history.csv.*.tmp'))),            # checkpoint ahead of the history file
    ('batch:1',                 lambda d: (d/'last.pt').exists()),                       # epoch 4, first batch
]


def test_sigkill_at_chosen_moments_then_resume(tmp_path):
    "A run SIGKILLed mid-batch and at every step of a checkpoint write, restarted with the same command each time, ends bit-identical to one that never stopped"
    def run(d, kill='none'):
        env = dict(os.environ, KILL_AT=kill, OMP_NUM_THREADS='1')
        return subprocess.run([sys.executable, '-c', WORKER, str(d)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = run(tmp_path/'ref'); assert ref.returncode == 0, ref.stderr.decode()[-2000:]
    d = tmp_path/'killed'
    for kill, left in KILLS:
        p = run(d, kill)
        assert p.returncode == -signal.SIGKILL, (kill, p.returncode, p.stderr.decode()[-2000:])   # the kill point was reached
        assert left(d), (kill, sorted(f.name for f in d.iterdir()))
    p = run(d); assert p.returncode == 0, p.stderr.decode()[-2000:]
    a, b = torch.load(d/'last.pt', weights_only=True), torch.load(tmp_path/'ref'/'last.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 4
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert [r['epoch'] for r in a['history']] == [1, 2, 3, 4]
    epochs = [l.split(',')[0] for l in (d/'history.csv').read_text().splitlines()[1:]]
    assert epochs == ['1', '2', '3', '4']
    strip = lambda h: [{k: v for k, v in r.items() if 'seconds' not in k} for r in h]
    assert strip(a['history']) == strip(b['history'])
    assert json.loads((d/'run.json').read_text())['status'] == 'done'
    assert not list(d.glob('.*.tmp')) and not (d/'last.pt.new').exists()   # stale partial writes cleaned up
