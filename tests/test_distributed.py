"""DDP on the CPU: 2 gloo processes under torchrun match one process on the same global batch, only rank 0 writes,
a job that torchrun restarts resumes, and a tiny ImageFolder trains one epoch end to end.

This file is also the worker script that torchrun launches (`python tests/test_distributed.py MODE ...`)."""
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch
import cifar_kit  # noqa: F401  (installs the torchvision shim before torchvision is imported)
from cifar_kit.learner import Callback
from cifar_kit.config import config_from
from cifar_kit.train import train, setup
from cifar_kit.data.readers import write_fake_cifar, write_fake_imagefolder
from cifar_kit.run.files import read_history
from cifar_kit.run.distributed import init_distributed, cleanup_distributed, distributed, torchrun_command, on_rank0, per_rank_batch

HERE = Path(__file__).resolve()
RUN_FILES = ['config.json', 'curves.png', 'history.csv', 'last.pt', 'last.pt.prev', 'run.json']


class NoAugment(Callback):
    "Turn off the random crops, so that one process and two see exactly the same pixels"
    def before_fit(self):
        dl = self.learn.train_dl
        getattr(dl, 'dl', dl).batch_tfm = None


class KillOnce(Callback):
    "SIGKILL rank 1 after epoch `n` (after its checkpoint and barrier) on torchrun's first attempt only"
    order = 50
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.learn.epoch == self.n and self.learn.rank == 1 and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0':
            os.kill(os.getpid(), signal.SIGKILL)


def equiv_config(data, run_dir):
    # AlexNet has neither BatchNorm (per-rank batch statistics) nor dropout (per-rank random masks): the comparison is exact
    return config_from(arch='alexnet', dataset='cifar10', data_dir=str(data), epochs=2, batch_size=16, eval_batch_size=64, lr=0.05,
                       device='cpu', progress='off', deterministic=True, run_dir=str(run_dir))


def _torchrun(args, nproc=2, max_restarts=0, cwd=None, timeout=3600):   # only a guard against a wedged torchrun agent, never a speed limit
    cmd = torchrun_command(*args, nproc_per_node=nproc, max_restarts=max_restarts)
    if args[0] not in ('train',): i = cmd.index('-m'); cmd[i:i+2] = [str(HERE)]    # run this file as the worker script
    env = os.environ | {'OMP_NUM_THREADS': '1', 'CIFAR_KIT_PROGRESS': 'off', 'PYTHONPATH': str(HERE.parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_fake_cifar(root, n=16, seed=1)    # 80 training images (5 global batches of 16), 16 test images
    return root


def test_no_torchrun_is_single_process(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'): monkeypatch.delenv(k, raising=False)
    assert init_distributed() == (0, 1, 0) and not torch.distributed.is_initialized()
    with distributed() as ranks: assert ranks == (0, 1, 0)
    assert on_rank0(lambda: 'x') == 'x' and per_rank_batch(256, 8) == 32


def test_batch_must_divide(cifar):
    c = config_from(arch='alexnet', dataset='cifar10', data_dir=str(cifar), batch_size=15, device='cpu')
    with pytest.raises(ValueError, match=r'batch_size 15 \(the global batch\) must be divisible by the 2 processes'): setup(c, 0, 2)
    with pytest.raises(ValueError, match='SyncBatchNorm runs on CUDA GPUs only'): setup(config_from('resnet20-digits', sync_bn=True, device='cpu'), 0, 2)
    with pytest.raises(ValueError, match='each process uses cuda:LOCAL_RANK'): setup(config_from('resnet20-digits', device='cuda:1'), 0, 2)


def test_ddp_matches_one_process(cifar, tmp_path):
    "2 ranks x 8 images == 1 process x 16 images: same weights after 10 SGD steps, same (global) metrics"
    p = _torchrun(['equiv', str(cifar), str(tmp_path/'ddp')])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    one = train(equiv_config(cifar, tmp_path/'one'), cbs=[NoAugment()]).record
    assert one['status'] == 'done'
    a = torch.load(tmp_path/'ddp'/'last.pt', weights_only=True)['model']
    b = torch.load(tmp_path/'one'/'last.pt', weights_only=True)['model']
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], torch.load(tmp_path/'one'/'last.pt.prev', weights_only=True)['model'][k]) for k in a)  # it did train
    ha, hb = read_history(tmp_path/'ddp'/'history.csv'), read_history(tmp_path/'one'/'history.csv')
    for ra, rb in zip(ha, hb):   # torchmetrics reduced over both ranks: the loss of the whole epoch, not rank 0's half
        for k in ('train_loss', 'train_top1', 'test_loss', 'test_top1', 'test_top5'): assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-4), k
    assert json.loads((tmp_path/'ddp'/'run.json').read_text())['images_per_s'] > 0


def test_rank0_writes_and_restart_resumes(cifar, tmp_path):
    "torchrun --max-restarts 1: rank 1 is killed after epoch 1, torchrun restarts both ranks, they resume at epoch 2"
    out, cwd = tmp_path/'run', tmp_path/'cwd'; cwd.mkdir()
    args = ['crash', str(cifar), str(out)]
    p = _torchrun(args, max_restarts=1, cwd=cwd)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count('resuming') == 1 and 'at epoch 2' in p.stdout, p.stdout
    assert p.stdout.count('done: alexnet on cifar10, 3 epochs') == 1, p.stdout       # printed by rank 0 only
    assert sorted(q.name for q in out.iterdir()) == RUN_FILES       # no per-rank copies, no temporary files left
    assert list(cwd.iterdir()) == [] and not (HERE.parent/'runs').exists()
    assert [r['epoch'] for r in read_history(out/'history.csv')] == [1, 2, 3]   # each epoch once
    rec = json.loads((out/'run.json').read_text())
    assert (rec['status'], rec['epochs']) == ('done', 3)
    # the same command again: every rank agrees there is nothing to do
    p = _torchrun(['train', *_cli_args(cifar, out)], cwd=cwd)
    assert p.returncode == 0 and p.stdout.count('already holds the finished run') == 1, p.stdout + p.stderr[-3000:]


def _cli_args(data, out):
    return ['--arch', 'alexnet', '--dataset', 'cifar10', '--data-dir', str(data), '--epochs', '3', '--batch-size', '16',
            '--lr', '0.05', '--device', 'cpu', '--progress', 'off', '--out-dir', str(out)]


def test_imagefolder_one_epoch(tmp_path):
    "The ImageNet path (ImageFolder, DataLoader workers, standard transforms) end to end on a tiny generated folder"
    root = write_fake_imagefolder(tmp_path/'in', n_per_class=2, classes=('a', 'b', 'c', 'd', 'e', 'f'), size=64)
    c = config_from(arch='resnet18', dataset='imagenet', data_dir=str(root), epochs=1, batch_size=4, eval_batch_size=4,
                    num_workers=0, device='cpu', progress='off', run_dir=str(tmp_path/'run'))
    assert (c.recipe, c.milestones, c.wd) == ('resnet18-in1k', (), 1e-4)   # the seed's imagenet.py recipe, cut to 1 epoch
    rec = train(c).record
    h = read_history(tmp_path/'run'/'history.csv')
    assert rec['status'] == 'done' and len(h) == 1
    assert 0 <= h[0]['test_top1'] <= h[0]['test_top5'] <= 100 and rec['final_test_err_top5_pct'] is not None
    assert config_from('resnet18-in1k').num_workers is None   # None: min(8, CPUs per rank - 1) workers for ImageNet


# --- the worker script, run by torchrun ---

def _worker(mode, data, run_dir):
    if mode == 'equiv':
        with distributed(device='cpu') as (rank, world_size, _):
            train(equiv_config(data, run_dir), cbs=[NoAugment()], rank=rank, world_size=world_size)
    elif mode == 'crash':
        import cifar_kit.cli as cli
        # the real command line, with a crash after epoch 1 (beside the callbacks the command adds itself)
        cli.train = lambda *a, cbs=(), **k: train(*a, cbs=[KillOnce(1), *cbs], **k)
        sys.exit(cli.main(['train', *_cli_args(data, run_dir)]))


if __name__ == '__main__': _worker(*sys.argv[1:])
