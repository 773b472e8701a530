"""Trust in a run folder, round 3: its files are regular files in it (never a link, a pipe or a device, never written
through), reads are bounded, and faults (a full disk, a read-only or deleted folder) end a run in one line.

Every test also checks that nothing already written was changed: the bytes of the run folder, and of the file a planted
link points to, are compared before and after."""
import errno, io, json, os, shutil, tempfile
from pathlib import Path
import pytest
import torch
from cifar_kit.learner import Callback
from cifar_kit.run.disk import RunFileError, RunWriteError, TMP_TAG, JSON_DEPTH, atomic_save, _write_error
from cifar_kit.run.files import CheckpointError
from cifar_kit.run.lock import RunLock
from cifar_kit.train import train
from cli_helpers import one_line_error, run_cli
from run_helpers import TINY, snapshot, copy_run

# the same run from the command line
CLI = ['--recipe', 'resnet20-digits', '--limit-batches', '1', '--deterministic', '--progress', 'off',
       '--eval-batch-size', '512', '--device', 'cpu']
DEEP = '[' * 100_000 + ']' * 100_000   # 200 KB of nested lists: json.loads raises RecursionError



# ---------------------------------------------------------------- the lock file

PLANTS = {'a symbolic link': lambda p, t: os.symlink(t, p), 'a hard link': lambda p, t: os.link(t, p),
          'a named pipe': lambda p, t: os.mkfifo(p), 'a folder': lambda p, t: os.mkdir(p)}


@pytest.mark.parametrize('kind', list(PLANTS))
def test_a_planted_lock_file_is_refused_and_nothing_is_written_through_it(tmp_path, capsys, kind):
    "A run folder from a tarball may hold a .cifar_kit.lock that is a link to any file of the user's: never written"
    target = tmp_path/'precious.txt'; target.write_bytes(b'the user\'s own file, not to be overwritten\n' * 3)
    d = tmp_path/'run'; d.mkdir(); PLANTS[kind](d/RunLock.name, target)
    before, target_before = snapshot(d), target.read_bytes()
    one_line_error(capsys, 'train', *CLI, '--epochs', '1', '--out-dir', d,
                   contains=f"{d/RunLock.name} is {kind}, not a regular file")
    assert target.read_bytes() == target_before and snapshot(d) == before
    assert sorted(p.name for p in d.iterdir()) == [RunLock.name]   # nothing else was written


def test_a_dangling_lock_link_is_refused_and_its_target_never_made(tmp_path, capsys):
    d = tmp_path/'run'; d.mkdir(); os.symlink(tmp_path/'made-by-the-kit', d/RunLock.name)
    one_line_error(capsys, 'train', *CLI, '--epochs', '1', '--out-dir', d, contains='is a symbolic link, not a regular file')
    assert not (tmp_path/'made-by-the-kit').exists() and sorted(p.name for p in d.iterdir()) == [RunLock.name]


# ---------------------------------------------------------------- the run's own files

@pytest.mark.parametrize('name, link_to, says', [
    ('run.json', 'copy', 'run.json is a symbolic link, not a regular file'),
    ('run.json', '/dev/zero', 'run.json is a symbolic link, not a regular file'),
    ('config.json', 'copy', 'config.json is a symbolic link, not a regular file'),
    ('config.json', '/dev/zero', 'config.json is a symbolic link, not a regular file'),
    ('config.json', 'fifo', 'config.json is a named pipe, not a regular file'),
    ('last.pt', 'copy', 'last.pt is a symbolic link, not a regular file'),
])
def test_run_files_that_are_links_pipes_or_devices_are_refused(tmp_path, done_run, capsys, name, link_to, says):
    "Resume reads run.json, config.json and last.pt only as the folder's own regular files; the link's target is untouched"
    d = copy_run(done_run, tmp_path/'run')
    target = tmp_path/'elsewhere'/name
    if link_to == 'fifo': (d/name).unlink(); os.mkfifo(d/name)
    else:
        target.parent.mkdir(); shutil.move(d/name, target)   # the link would read the same bytes as the file did
        os.symlink(target if link_to == 'copy' else link_to, d/name)
    before = snapshot(d)
    target_before = target.read_bytes() if target.exists() else None
    with pytest.raises(RunFileError, match=says) as e: train(**TINY, epochs=2, run_dir=str(d))
    assert '\n' not in str(e.value)
    one_line_error(capsys, 'train', *CLI, '--epochs', '2', '--out-dir', d, contains=says)
    assert snapshot(d) == before and (os.path.islink(d/name) or link_to == 'fifo')
    if target_before is not None: assert target.read_bytes() == target_before


def test_a_json_file_nested_100000_deep_is_refused_in_one_line(tmp_path, done_run, capsys):
    d = copy_run(done_run, tmp_path/'run')
    (d/'config.json').write_text(DEEP)
    before = snapshot(d)
    one_line_error(capsys, 'train', *CLI, '--epochs', '2', '--out-dir', d,
                   contains=f"config.json nests lists or objects more than {JSON_DEPTH} deep")
    assert snapshot(d) == before


# ---------------------------------------------------------------- the table reads records the same way

def test_the_table_skips_linked_or_deep_records_in_one_line_and_lists_a_row_it_has_not(tmp_path, done_run, capsys):
    "run.json linked to /dev/zero, a 100,000-deep run.json, a history.csv linked elsewhere: skipped or unverified, named"
    runs = tmp_path/'runs'
    zero, deep, linked = (copy_run(done_run, runs/'resnet20-digits'/f'seed{k}') for k in (1, 2, 0))
    (zero/'run.json').unlink(); os.symlink('/dev/zero', zero/'run.json')
    (deep/'run.json').write_text(DEEP)
    shutil.move(linked/'history.csv', tmp_path/'history.csv'); os.symlink(tmp_path/'history.csv', linked/'history.csv')
    busy = runs/'resnet164-c10'/'seed0'; busy.mkdir(parents=True)   # a benchmark row's run in progress: plotted if it can be
    shutil.copy(done_run/'config.json', busy); (tmp_path/'notes.txt').write_text('my notes,\nnot a history\n')
    os.symlink(tmp_path/'notes.txt', busy/'history.csv')
    before, history = snapshot(runs), (tmp_path/'history.csv').read_bytes()
    code, out, err = run_cli(capsys, 'table', '--runs-dir', runs, '--out-dir', tmp_path/'table', '--smoke')
    assert code == 0 and 'Traceback' not in err, err
    lines = err.splitlines()
    assert any(f"skipped {zero/'run.json'} is a symbolic link, not a regular file" in l for l in lines), err
    assert any(f"skipped {deep/'run.json'} nests lists or objects more than {JSON_DEPTH} deep" in l for l in lines), err
    assert any(f"left out of the plot: {busy/'history.csv'} is a symbolic link, not a regular file" in l for l in lines), err
    # the demo's row is no benchmark row: its done run is listed under the table, with why
    md = (tmp_path/'table'/'RESULTS.md').read_text()
    assert ('* `resnet20-digits` seed 0: unverified, not a benchmark row' in md and '## Records outside the table' in md), md
    assert any(l.startswith('warning: not in the table: resnet20-digits seed 0: unverified, not a benchmark row')
               for l in lines), err
    assert snapshot(runs) == before and (tmp_path/'history.csv').read_bytes() == history


def test_a_done_run_of_a_row_the_table_has_not_is_listed_with_why(tmp_path, done_run, capsys):
    runs = tmp_path/'runs'
    copy_run(done_run, runs/'resnet20-digits'/'seed0')
    code, out, err = run_cli(capsys, 'table', '--runs-dir', runs, '--out-dir', tmp_path/'table', '--smoke')
    assert code == 0, err
    md = (tmp_path/'table'/'RESULTS.md').read_text()
    assert ('## Records outside the table\n\nFinished runs under rows the table does not have, so they enter no mean:\n\n'
            '* `resnet20-digits` seed 0: done, not a benchmark row (the tables show the faithful CIFAR and ImageNet '
            'recipes and their modern twins)\n') in md, md
    assert 'warning: not in the table: resnet20-digits seed 0: done, not a benchmark row' in err, err


# ---------------------------------------------------------------- a full disk

def test_torch_saves_full_disk_is_told_in_one_line(monkeypatch):
    "torch.save onto a full disk raises RuntimeError('... unexpected pos ...') over the disk's ENOSPC: one line"
    obj, path = {'w': torch.zeros(100_000)}, Path(tempfile.gettempdir())/'r'/'last.pt.new'
    says = (errno.ENOSPC, f'No space left on the device while writing {path}: free space and rerun to resume')

    class Disk(io.RawIOBase):   # a disk that fills up after 700 bytes
        def __init__(self): self.left = 700
        def writable(self): return True
        def write(self, b):
            if not self.left: raise OSError(errno.ENOSPC, 'No space left on device')
            n = min(len(b), self.left); self.left -= n; return n
    for f in (lambda: open('/dev/full', 'wb'), lambda: io.BufferedWriter(Disk())):
        with pytest.raises(Exception) as e, f() as out: torch.save(obj, out)
        err = _write_error(e.value, path)
        assert (err.errno, str(err)) == says, e.value
    with pytest.raises(RuntimeError, match='unexpected pos') as e: torch.save(obj, io.BufferedWriter(Disk()))
    bare = RuntimeError(str(e.value))                 # torch's message without the ENOSPC under it: ask the disk
    err = _write_error(bare, path)                    # this disk has room: a short write, not a full disk
    assert err.errno == errno.EIO and 'came up short (' in str(err) and '\n' not in str(err), err
    class Vfs: f_bavail, f_frsize = 2, 4096
    monkeypatch.setattr(os, 'statvfs', lambda p: Vfs())
    assert (_write_error(bare, path).errno, str(_write_error(bare, path))) == says


class FullDisk:
    "torch.save as on a full disk: part of the file, then torch's RuntimeError; os.statvfs: 8 KiB free"
    def __init__(self, monkeypatch): self.mp = monkeypatch
    def __enter__(self):
        def save(obj, f, *a, **kw):
            f.write(b'PK\x03\x04 part of a checkpoint')
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
        class Vfs: f_bavail, f_frsize = 2, 4096
        self.mp.setattr(torch, 'save', save); self.mp.setattr(os, 'statvfs', lambda p: Vfs())
    def __exit__(self, *exc): self.mp.undo()


def test_a_full_disk_during_the_background_checkpoint_write_ends_in_one_line(tmp_path, done_run, capsys, monkeypatch):
    d = copy_run(done_run, tmp_path/'run')
    keep = {n: (d/n).read_bytes() for n in ('last.pt',)}   # config.json: rewritten with the new plan, as on any resume
    with FullDisk(monkeypatch):   # last.pt exists, so epoch 2's checkpoint is written in the background
        line = one_line_error(capsys, 'train', *CLI, '--epochs', '2', '--out-dir', d,
                              contains=f"No space left on the device while writing {d/'last.pt.new'}: "
                                       "free space and rerun to resume")
    assert 'unexpected pos' not in line
    assert {n: (d/n).read_bytes() for n in keep} == keep                      # nothing lost
    assert not [p.name for p in d.iterdir() if p.name.startswith(TMP_TAG) or p.name == 'last.pt.new']
    run = train(**TINY, epochs=2, run_dir=str(d))                            # space again: the run resumes and ends
    assert run.record['status'] == 'done' and [r['epoch'] for r in run.history] == [1, 2]


def test_atomic_save_onto_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    atomic_save({'v': 1}, tmp_path/'x.pt'); old = (tmp_path/'x.pt').read_bytes()
    with FullDisk(monkeypatch), pytest.raises(RunWriteError) as e: atomic_save({'v': 2}, tmp_path/'x.pt')
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert (tmp_path/'x.pt').read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ['x.pt']


# ---------------------------------------------------------------- the folder changes under the run

class AtEpoch(Callback):
    "At the end of epoch `epoch` (before the checkpoint is saved), call `act(run_dir)`"
    order = 1
    def __init__(self, epoch:int, act): self.epoch, self.act = epoch, act
    def after_epoch(self):
        if self.learn.epoch == self.epoch: self.act()


def test_a_folder_turned_read_only_mid_run_reports_the_first_error(tmp_path, done_run, monkeypatch, capsys):
    "The lock's release cannot remove its file either: that must not hide the error that stopped the run"
    d = copy_run(done_run, tmp_path/'run')
    keep = {n: (d/n).read_bytes() for n in ('last.pt', 'history.csv')}   # config.json: the new plan, as on any resume
    def read_only():   # what a read-only folder does, as root too (root ignores a folder's mode)
        def refuse(*a, **kw): raise PermissionError(errno.EACCES, 'Permission denied')
        monkeypatch.setattr(tempfile, 'mkstemp', refuse)
        real_unlink = os.unlink
        monkeypatch.setattr(os, 'unlink', lambda p, *a, **kw: refuse() if str(p).endswith(RunLock.name) else real_unlink(p, *a, **kw))
    with pytest.raises(OSError, match=f"{d} is read-only \\(Permission denied\\): history.csv was not written") as e:
        train(**TINY, epochs=2, run_dir=str(d), cbs=[AtEpoch(2, read_only)])
    assert 'make the folder writable and rerun to resume' in str(e.value) and '\n' not in str(e.value)
    monkeypatch.undo()
    assert {n: (d/n).read_bytes() for n in keep} == keep


def test_a_run_folder_deleted_mid_run_stops_in_one_line_and_is_not_re_created(tmp_path, done_run, capsys):
    d = copy_run(done_run, tmp_path/'run')
    # CheckpointCB wraps it in a CheckpointError ("could not save the checkpoint of epoch 2 in RUN (...)")
    with pytest.raises((OSError, CheckpointError), match=f"the run folder {d} was deleted or moved while the run wrote") as e:
        train(**TINY, epochs=2, run_dir=str(d), cbs=[AtEpoch(2, lambda: shutil.rmtree(d))])
    assert '\n' not in str(e.value) and 'nothing was re-created' in str(e.value)
    assert not d.exists()                                    # no half folder: no checkpoint, no history, no record
    assert 'Traceback' not in capsys.readouterr().err


def test_config_file_is_read_bounded_and_never_through_a_link(tmp_path, capsys):
    "`train --config` refuses a link (to /dev/zero: it would read forever) and JSON nested 100,000 deep, in one line"
    from cifar_kit.cli import main
    (tmp_path/'zero.json').symlink_to('/dev/zero')
    (tmp_path/'deep.json').write_text('[' * 100_000 + ']' * 100_000)
    for name, needle in (('zero.json', 'is a symbolic link, not a regular file'), ('deep.json', 'is not valid JSON')):
        code = main(['train', '--config', str(tmp_path/name), '--print-config'])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
