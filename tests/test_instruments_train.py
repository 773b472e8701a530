"""`train --instruments`: the flags, the one-line refusal, the files of a run with every instrument, an exact resume, a
run trained exactly as without them, and no host read inside a training step (counted as the kit counts its steps)."""
import csv, json
from pathlib import Path
import pytest
import torch
from cli_helpers import run_cli, one_line_error
from cifar_kit.config import config_from, INSTRUMENTS
from cifar_kit.learner import Callback, DispatchCounter
from cifar_kit.train import train, INSTRUMENT_CBS

ALL = ','.join(INSTRUMENTS)
# small and quick: 2 batches of 32 an epoch, a probe batch of 32 (noise scale: 2 chunks of 16), 4 Lanczos steps
SMALL = dict(arch='resnet20', dataset='digits8', epochs=2, lr=0.05, batch_size=32, limit_batches=2, device='cpu',
             progress='off', instrument_n=32, noise_batch=16, sharpness_k=2, sharpness_iters=4)
FILES = {'cka': 'cka.csv', 'collapse': 'collapse.csv', 'sharpness': 'sharpness.csv', 'noise': 'noise.csv'}


def rows(path:Path)->list[list[str]]:
    with open(path, newline='') as f: return list(csv.reader(f))


def epochs(path:Path)->list[int]: return sorted({int(r[0]) for r in rows(path)[1:]})


def test_every_name_is_registered():
    assert sorted(INSTRUMENT_CBS) == sorted(INSTRUMENTS) == sorted(FILES)


def test_flags_parse(capsys):
    code, out, _ = run_cli(capsys, 'train', '--arch', 'resnet20', '--dataset', 'digits8', '--instruments', 'cka,collapse',
                           '--instrument-every', '3', '--sharpness-k', '2', '--print-config')
    cfg = json.loads(out)
    assert code == 0 and (cfg['instruments'], cfg['instrument_every'], cfg['sharpness_k']) == ('cka,collapse', 3, 2)
    assert (cfg['instrument_n'], cfg['noise_batch']) == (256, 32)   # the defaults


def test_a_bad_name_is_refused_before_any_work(capsys, tmp_path):
    line = one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'digits8', '--instruments', 'cka,hessian',
                          '--out-dir', tmp_path/'run', contains="unknown 'hessian'")
    assert 'choose from cka, collapse, sharpness, noise' in line and not (tmp_path/'run').exists()
    one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'digits8', '--instruments', 'noise',
                   '--instrument-n', '40', '--out-dir', tmp_path/'run', contains='--noise-batch 32: give a multiple')
    assert not (tmp_path/'run').exists()


class _Window(Callback):
    "Count the aten ops of every training step, from its first event (before_batch) to its last (after_step)"
    def __init__(self, counts:list): self.counts = counts
class _Open(_Window):
    order = -1000
    def before_batch(self):
        if self.learn.training: self.counts.append(DispatchCounter().__enter__())
class _Close(_Window):
    order = 1000
    def after_step(self):
        if self.learn.training: self.counts[-1].__exit__(None, None, None)


class _Reads(Callback):
    "A callback that reads the loss back in every step: the check must see it"
    def after_loss(self):
        if self.learn.training: self.learn.loss.item()


def _run(tmp_path, name, extra=(), **kw):
    return train(config_from(**SMALL | dict(run_dir=str(tmp_path/name)) | kw), cbs=list(extra))


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    "One run with every instrument on and its steps counted; the same run without instruments"
    tmp, counts = tmp_path_factory.mktemp('instr'), []
    run = _run(tmp, 'all', [_Open(counts), _Close(counts)], instruments=ALL)
    plain = _run(tmp, 'plain')
    return run, plain, counts


def test_a_run_writes_each_file_and_its_plot(measured):
    run, _, _ = measured
    for f in FILES.values():
        assert epochs(run.run_dir/f) == [0, 1, 2], f   # before training and after each epoch
        assert (run.run_dir/f).with_suffix('.png').stat().st_size > 0
    n_layers = len({r[1] for r in rows(run.run_dir/'cka.csv')[1:]})
    assert len(rows(run.run_dir/'cka.csv')) == 1 + 3 * n_layers and rows(run.run_dir/'sharpness.csv')[0][-2:] == ['eig1', 'eig2']


def test_the_instruments_change_nothing_trained(measured):
    "Run-only: the same losses and accuracies, to the bit, with every instrument on as with none"
    run, plain, _ = measured
    keys = ('train_loss', 'train_top1', 'test_loss', 'test_top1')
    assert [[h[k] for k in keys] for h in run.history] == [[h[k] for k in keys] for h in plain.history]


def test_no_host_read_inside_a_step(measured):
    _, _, counts = measured
    assert len(counts) == 4                                            # 2 epochs of 2 steps, each counted
    assert all(c.total > 100 for c in counts)                          # the window holds the step's work
    assert [(c.reads, c.from_python, c.data_dependent) for c in counts] == [(0, 0, 0)] * 4


def test_the_check_sees_a_read(tmp_path):
    counts = []
    _run(tmp_path, 'reads', [_Open(counts), _Close(counts), _Reads()], epochs=1, instruments='collapse')
    assert [c.reads for c in counts] == [1, 1]


class _Crash(Callback):
    "Fail after epoch 1's checkpoint: before the instruments measure it (order 13), or after (order 25)"
    def __init__(self, order:int): self.order = order
    def after_epoch(self):
        if self.learn.epoch == 1: raise RuntimeError('crash')


@pytest.mark.parametrize('order', [13, 25])
def test_a_resumed_run_writes_the_rows_of_an_uninterrupted_one(measured, tmp_path, order):
    run, _, _ = measured
    with pytest.raises(RuntimeError, match='crash'): _run(tmp_path, 'r', [_Crash(order)], instruments=ALL)
    assert epochs(tmp_path/'r'/'cka.csv') == ([0] if order == 13 else [0, 1])
    _run(tmp_path, 'r', instruments=ALL)                              # the same command again: it resumes at epoch 2
    for f in FILES.values(): assert rows(tmp_path/'r'/f) == rows(run.run_dir/f), f
