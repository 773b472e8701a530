"""Trust in a run folder: one run per folder, a changed plan trains as planned, no restart over good work, user files
untouched, files readable by the team, bounded reading, signals end a run cleanly, damaged records explained.

Every test also checks that nothing already written was lost: the files' bytes before and after are compared."""
import json, os, signal, stat, subprocess, sys, time, zipfile
from pathlib import Path
import pytest
import torch
from cifar_kit.learner import Callback
from cifar_kit.run.signals import RunInterrupted
from cifar_kit.run.lock import RunLockedError, remove_partial_writes
from cifar_kit.run.files import CheckpointError, RunFileError, load_checkpoint_file, TMP_TAG
from cifar_kit.train import train, evaluate_checkpoint
from cli_helpers import one_line_error, as_at_a_terminal
from run_helpers import TINY, snapshot, copy_run

CLI = ['--recipe', 'resnet20-digits', '--device', 'cpu', '--progress', 'off', '--deterministic']   # the same run from the command line





# ---------------------------------------------------------------- 4: a changed plan

@pytest.mark.parametrize('schedule, first, then, milestones', [('multistep', 2, 4, [3]), ('cosine', 2, 4, [])])
def test_changed_plan_gives_every_epoch_the_new_plans_lr(tmp_path, schedule, first, then, milestones):
    "A finished run extended (more epochs, a milestone now inside the plan) trains on at the new plan's rates"
    grown = tmp_path/'grown'
    train(**TINY, epochs=first, milestones=(), schedule=schedule, run_dir=str(grown))
    before = snapshot(grown)
    old_rows = (grown/'history.csv').read_text().splitlines()
    run = train(**TINY, epochs=then, milestones=tuple(milestones), schedule=schedule, run_dir=str(grown))
    fresh = train(**TINY, epochs=then, milestones=tuple(milestones), schedule=schedule, run_dir=str(tmp_path/'fresh'))
    # every epoch after the resume, exactly (the epochs already trained keep the rates they had: here the same for multistep)
    assert [r['lr'] for r in run.history[first:]] == [r['lr'] for r in fresh.history[first:]]
    if schedule == 'multistep': assert [r['lr'] for r in run.history] == [r['lr'] for r in fresh.history]
    if schedule == 'multistep': assert [round(r['lr'], 6) for r in run.history] == [0.05, 0.05, 0.05, 0.005]   # the old plan: 0.05 throughout
    assert run.record['plan_changes'] == [{'at_epoch': first, 'from': {'epochs': first, 'milestones': []},
                                           'to': {'epochs': then, 'milestones': milestones}}]
    assert json.loads((grown/'run.json').read_text())['plan_changes'] == run.record['plan_changes']
    assert (grown/'history.csv').read_text().splitlines()[:first + 1] == old_rows       # the epochs already trained are kept
    assert torch.load(grown/'last.pt.prev', weights_only=True)['epoch'] == then - 1 and set(before) <= set(snapshot(grown))


# ---------------------------------------------------------------- 5: no restart over good work; user files

def test_both_checkpoints_unreadable_is_refused_and_nothing_changes(tmp_path, done_run, capsys):
    d = copy_run(done_run, tmp_path/'run')
    good = (d/'last.pt').read_bytes()
    (d/'best.pt').write_bytes(good)                                         # stands for a good best.pt
    (d/'last.pt').write_bytes(good[:3000])
    (d/'last.pt.prev').write_bytes(b'PK\x03\x04 cut short')
    before = snapshot(d)
    with pytest.raises(CheckpointError, match='last.pt and last.pt.prev in .* are both unreadable') as e:
        train(**TINY, epochs=3, run_dir=str(d))
    assert '\n' not in str(e.value) and 'restore last.pt' in str(e.value)
    assert snapshot(d) == before
    one_line_error(capsys, 'train', *CLI, '--epochs', '3', '--out-dir', d, contains='both unreadable')
    assert snapshot(d) == before


def test_results_without_a_checkpoint_are_refused(tmp_path, done_run):
    d = copy_run(done_run, tmp_path/'run')
    os.remove(d/'last.pt'); (d/'run.json').unlink()
    before = snapshot(d)
    with pytest.raises(CheckpointError, match='holds history.csv but no checkpoint to resume from'): train(**TINY, epochs=2, run_dir=str(d))
    assert snapshot(d) == before


@pytest.mark.parametrize('name', ['history.csv', 'run.json', '.notes.tmp'])
def test_a_folder_that_is_not_a_run_folder_is_refused(tmp_path, capsys, name):
    d = tmp_path/'mine'; d.mkdir(); (d/name).write_text('my own work\n'); (d/'notes.txt').write_text('keep\n')
    before = snapshot(d)
    with pytest.raises(RunFileError, match='is not a cifar_kit run folder'): train(**TINY, epochs=1, run_dir=str(d))
    one_line_error(capsys, 'train', *CLI, '--epochs', '1', '--out-dir', d, contains='is not a cifar_kit run folder')
    assert snapshot(d) == before


def test_cleaning_deletes_only_the_kits_own_dead_temp_files(tmp_path, done_run):
    d = copy_run(done_run, tmp_path/'run')
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    try:
        from cifar_kit.run.files import _host
        stale = d/f'{TMP_TAG}{dead.pid}@{_host()}.last.pt.abc.tmp'
        busy = d/f'{TMP_TAG}{live.pid}@{_host()}.distill.json.abc.tmp'
        for p in (stale, busy, d/'.notes.tmp', d/'.hidden.tmp'): p.write_text('x')
        before = snapshot(d)
        train(**TINY, epochs=2, run_dir=str(d))
        after = snapshot(d)
        assert not stale.exists() and busy.exists() and (d/'.notes.tmp').exists() and (d/'.hidden.tmp').exists()
        for n in (busy.name, '.notes.tmp', '.hidden.tmp'): assert after[n] == before[n], n
        assert after['history.csv'].decode().splitlines()[:2] == before['history.csv'].decode().splitlines()[:2]
    finally: live.kill(); live.wait()


# ---------------------------------------------------------------- 3: one run per folder

HOLDER = r'''
import sys, time
from pathlib import Path
from cifar_kit.learner import Callback
from cifar_kit.train import train
class Wait(Callback):
    "After the first epoch: say so, then wait for the go-ahead"
    order = 60
    def after_epoch(self):
        if self.learn.epoch == 1:
            Path(sys.argv[2]).write_text('ready')
            while not Path(sys.argv[3]).exists(): time.sleep(0.05)
train(recipe='resnet20-digits', epochs=2, limit_batches=1, eval_batch_size=512, device='cpu', progress='off', deterministic=True,
      run_dir=sys.argv[1], cbs=[Wait()])
'''


def test_a_second_process_is_refused_and_names_the_holder(tmp_path):
    d, ready, go = tmp_path/'run', tmp_path/'ready', tmp_path/'go'
    a = subprocess.Popen([sys.executable, '-c', HOLDER, str(d), str(ready), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):                       # until the first process has finished an epoch (progress, not time)
            if ready.exists() or a.poll() is not None: break
            time.sleep(0.1)
        assert ready.exists(), a.communicate()[1][-2000:]
        before = snapshot(d)
        b = subprocess.run([sys.executable, '-m', 'cifar_kit', 'train', *CLI, '--epochs', '2', '--out-dir', str(d)],
                           capture_output=True, text=True, timeout=600)
        lines = [l for l in b.stderr.splitlines() if l.strip()]
        assert b.returncode == 2 and lines and f'is in use by pid {a.pid} on ' in lines[-1] and 'started' in lines[-1], b.stderr
        assert 'Traceback' not in b.stderr, b.stderr
        assert snapshot(d) == before                # the second process wrote nothing
    finally:
        go.write_text('go')
        out, err = a.communicate(timeout=600)
    assert a.returncode == 0, err[-2000:]
    assert json.loads((d/'run.json').read_text())['status'] == 'done' and not (d/'.cifar_kit.lock').exists()


# ---------------------------------------------------------------- 10: shared folders

def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try: train(**TINY, epochs=1, run_dir=str(tmp_path/'run'))
    finally: os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path/'run').iterdir()}
    assert set(modes) >= {'config.json', 'history.csv', 'last.pt', 'curves.png', 'run.json'}
    assert set(modes.values()) == {0o640}, modes


# ---------------------------------------------------------------- 9: bounded reading

def test_compressed_or_inflated_archives_are_refused_before_loading(tmp_path, done_run, capsys):
    good = done_run/'last.pt'
    before = snapshot(done_run)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path/'deflated.pt', 'w', zipfile.ZIP_DEFLATED) as dst:
        for i in src.infolist(): dst.writestr(i.filename, src.read(i))
    msg = one_line_error(capsys, 'eval', '--checkpoint', tmp_path/'deflated.pt', '--device', 'cpu', contains='compressed entries')
    assert 'deflated.pt' in msg
    # a stored archive whose directory claims a huge entry
    with zipfile.ZipFile(tmp_path/'claims.pt', 'w', zipfile.ZIP_STORED) as z: z.writestr('archive/data.pkl', b'x' * 10)
    raw = bytearray((tmp_path/'claims.pt').read_bytes()); at = raw.index(b'PK\x01\x02')
    raw[at + 24:at + 28] = (4_000_000_000).to_bytes(4, 'little'); (tmp_path/'claims.pt').write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match='claims 4,000,000,000 bytes'): load_checkpoint_file(tmp_path/'claims.pt')
    assert evaluate_checkpoint(good, device='cpu')['top1_pct'] >= 0        # the real ones still load
    assert snapshot(done_run) == before


# ---------------------------------------------------------------- 7: signals

SIGNALLED = r'''
import os, signal, sys
from cifar_kit.learner import Callback
from cifar_kit.run.signals import RunInterrupted
from cifar_kit.train import train
class Signal(Callback):
    "Sends the process signal argv[2] after the first epoch (its checkpoint is written by then)"
    order = 60
    def after_epoch(self):
        if self.learn.epoch == 1: os.kill(os.getpid(), int(sys.argv[2]))
try: train(recipe='resnet20-digits', epochs=3, limit_batches=1, eval_batch_size=512, device='cpu', progress='off', deterministic=True,
           run_dir=sys.argv[1], cbs=[Signal()] if int(sys.argv[2]) else [])
except RunInterrupted as e:
    print(e); print('signum', e.signum, e.epoch, e.epochs); sys.exit(128 + e.signum)
'''


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp('ref') / 'run'
    p = subprocess.run([sys.executable, '-c', SIGNALLED, str(d), '0'], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return d


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_like_ctrl_c(tmp_path, uninterrupted, signum):
    d = tmp_path/'run'
    p = subprocess.run([sys.executable, '-c', SIGNALLED, str(d), str(int(signum))], capture_output=True, text=True, timeout=600,
                       preexec_fn=as_at_a_terminal)
    assert p.returncode == 128 + signum, p.stderr[-2000:]
    assert 'interrupted at epoch 2/3; rerun the same command to resume' in p.stdout and f'signum {int(signum)} 2 3' in p.stdout, p.stdout
    assert json.loads((d/'run.json').read_text())['status'] == 'interrupted'
    ckpt = load_checkpoint_file(d/'last.pt')
    assert ckpt['epoch'] == 1 and [r['epoch'] for r in ckpt['history']] == [1]
    before = snapshot(d)
    p = subprocess.run([sys.executable, '-c', SIGNALLED, str(d), '0'], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and 'resuming' in p.stdout, p.stderr[-2000:]
    a, b = torch.load(d/'last.pt', weights_only=True), torch.load(uninterrupted/'last.pt', weights_only=True)
    assert a['epoch'] == 3 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])   # the resume is exact
    assert (d/'config.json').read_bytes() == before['config.json']
    assert (d/'history.csv').read_text().splitlines()[:2] == before['history.csv'].decode().splitlines()[:2]


# ---------------------------------------------------------------- 8: damaged records

@pytest.mark.parametrize('name, content, says', [
    ('config.json', '', 'config.json is empty'),
    ('config.json', '{"arch": "resnet20", "data', 'config.json is truncated or not JSON'),
    ('config.json', '[1, 2, 3]', 'config.json does not hold a JSON object'),
    ('run.json', '', 'run.json is empty'),
    ('run.json', '"done"', 'run.json does not hold a JSON object'),
])
def test_damaged_config_or_record_is_named_in_one_line(tmp_path, done_run, capsys, name, content, says):
    d = copy_run(done_run, tmp_path/'run')
    (d/name).write_text(content)
    before = snapshot(d)
    with pytest.raises(RunFileError, match=says): train(**TINY, epochs=2, run_dir=str(d))
    one_line_error(capsys, 'train', *CLI, '--epochs', '2', '--out-dir', d, contains=says)
    assert snapshot(d) == before


@pytest.mark.parametrize('config', [['resnet20'], {'arch': 'resnet20'}, {'arch': 3, 'dataset': 'digits'}, None])
def test_checkpoint_with_a_malformed_config_is_refused(tmp_path, done_run, capsys, config):
    d = copy_run(done_run, tmp_path/'run')
    ckpt = load_checkpoint_file(d/'last.pt'); ckpt['config'] = config
    torch.save(ckpt, d/'last.pt'); os.remove(d/'last.pt.prev') if (d/'last.pt.prev').exists() else None
    (d/'run.json').unlink()      # unfinished: the rerun resumes from the damaged checkpoint
    before = snapshot(d)
    one_line_error(capsys, 'eval', '--checkpoint', d/'last.pt', '--device', 'cpu', contains='has a malformed config')
    with pytest.raises(CheckpointError, match='has a malformed config'): train(**TINY, epochs=2, run_dir=str(d))
    assert snapshot(d) == before


def test_an_interrupt_that_python_wrapped_still_ends_as_an_interrupt(tmp_path):
    "A Ctrl-C inside a class definition (e.g. a lazy import) reaches the loop as a RuntimeError raised from it"
    import json
    from cifar_kit.learner import Callback
    from cifar_kit.run.signals import RunInterrupted
    from cifar_kit.config import config_from
    class Wrapped(Callback):
        def after_epoch(self):
            try: raise KeyboardInterrupt
            except KeyboardInterrupt as e: raise RuntimeError("Error calling __set_name__ on 'x'") from e
    c = config_from('resnet20-digits', epochs=2, limit_batches=1, device='cpu', progress='off', run_dir=str(tmp_path/'r'))
    with pytest.raises(RunInterrupted, match=r'interrupted at epoch \d/2; rerun the same command'): train(c, cbs=[Wrapped()])
    assert json.loads((tmp_path/'r'/'run.json').read_text())['status'] == 'interrupted'


_SIGNAL_IN_A_FINALIZER = '''
import os, signal, sys, time, weakref
from cifar_kit.learner import Callback
from cifar_kit.config import config_from
from cifar_kit.train import train
class Box: pass
class SignalInAFinalizer(Callback):
    "In epoch 2, a SIGTERM arrives while Python runs a weakref callback (as matplotlib's transform cleanup does)"
    def after_batch(self):
        if self.learn.epoch == 1 and self.learn.training and not getattr(self, 'sent', False):
            self.sent = True
            b = Box(); weakref.finalize(b, lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(2)); del b
c = config_from('resnet20-digits', epochs=50, limit_batches=2, device='cpu', progress='off', run_dir=sys.argv[1])
train(c, cbs=[SignalInAFinalizer()])
'''


def test_a_signal_that_lands_in_a_finalizer_still_ends_the_run(tmp_path):
    "Python only reports an exception raised in a finalizer; the run must still end, in that epoch, quietly, as interrupted"
    import json
    r = subprocess.run([sys.executable, '-c', _SIGNAL_IN_A_FINALIZER, str(tmp_path/'r')], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), preexec_fn=as_at_a_terminal)
    assert 'Exception ignored' not in r.stderr, r.stderr[-3000:]
    rec = json.loads((tmp_path/'r'/'run.json').read_text())
    assert rec['status'] == 'interrupted' and rec['epochs'] == 1, (rec, r.stderr[-3000:])   # stopped in epoch 2, not 49 epochs later
