"""Reproduction at scale: two drivers on the same rows, `--plan` and `--shard`, the local GPU pool, and submitit's local
and debug executors. The runs execute a stand-in template (papermill, a real kernel, the template's parameters) that
only logs its start and writes a `done` record, so the plumbing is tested in seconds; tests/test_reproduce.py runs the
real template."""
import json, os, subprocess, sys
from pathlib import Path
import nbformat
import pytest
import cifar_kit
from cifar_kit.reproduction.driver import reproduce, benchmark_rows, ELSEWHERE
from cifar_kit.run.files import read_record

ROOT = Path(__file__).resolve().parent.parent
ROWS = ['alexnet-c10', 'resnet110-c100']

_BODY = '''import json, os, pathlib, time
log = pathlib.Path(data_dir) / 'starts.log'
with open(log, 'a') as f:   # one line per execution: row, seed, the GPUs it sees
    f.write(f"{recipe} {seed} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n")
n, t = int(os.environ.get('FAKE_TOGETHER', '0')), time.time()   # wait until n runs have started: they run at once
while len(log.read_text().splitlines()) < n:
    if time.time() - t > 300: raise RuntimeError('the other run never started')
    time.sleep(0.1)
time.sleep(2)
pathlib.Path(out_dir, 'run.json').write_text(json.dumps({'status': 'done', 'recipe': recipe, 'seed': seed,
                                                         'smoke': smoke, 'epochs': 1, 'final_test_err_pct': 50.0}))
'''


@pytest.fixture
def fake(tmp_path):
    "A stand-in template, a folder for its start log (passed as data_dir) and a runs root"
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("recipe = ''\nseed = 0\ndata_dir = None\nout_dir = ''\nsmoke = False\n"
                                       "device = 'auto'\ndownload = False")
    params.metadata['tags'] = ['parameters']
    nb.cells = [params, nbformat.v4.new_code_cell(_BODY)]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, tmp_path / 'fake.ipynb')
    (tmp_path / 'log').mkdir()
    return {'template': tmp_path / 'fake.ipynb', 'log': tmp_path / 'log', 'runs': tmp_path / 'runs'}


def _starts(fake):
    return [l.split() for l in (fake['log'] / 'starts.log').read_text().splitlines()]


def _kw(fake):
    return dict(smoke=True, runs_dir=fake['runs'], data_dir=str(fake['log']), template=fake['template'], verbose=False)


_DRIVER = '''import json, sys
from cifar_kit.reproduction.driver import reproduce
a = json.loads(sys.argv[1])
res = reproduce(a['rows'], smoke=True, runs_dir=a['runs'], data_dir=a['log'], template=a['template'], verbose=False)
print(json.dumps([s['status'] for s in res]))
'''


def test_two_drivers_on_the_same_rows_run_each_once_and_record_no_failure(fake):
    "Started together: both exit 0, every run done, each executed exactly once, the other driver says running elsewhere"
    arg = json.dumps({'rows': ROWS, 'runs': str(fake['runs']), 'log': str(fake['log']), 'template': str(fake['template'])})
    env = os.environ | {'PYTHONPATH': str(ROOT)}
    ps = [subprocess.Popen([sys.executable, '-c', _DRIVER, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    statuses = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    for row in ROWS: assert read_record(fake['runs'] / row / 'seed0')['status'] == 'done'
    assert sorted((r, s) for r, s, _ in _starts(fake)) == sorted((r, '0') for r in ROWS)   # each run executed once
    # each run was done by one driver, and skipped by the other (held when it came, or already done)
    for k in range(len(ROWS)):
        assert sorted(s[k] for s in statuses) in (['done', ELSEWHERE], ['done', 'skipped']), statuses
    assert not list(fake['runs'].glob('*/.seed*.lock'))   # the drivers' locks are gone


def test_a_run_held_elsewhere_is_skipped_and_its_record_left_alone(fake):
    "Another process holds the run (here: this test, through the driver's lock): skipped, no record, exit status 0"
    from cifar_kit.reproduction.driver import _DriverLock, reproduce_cmd
    d = fake['runs'] / 'alexnet-c10' / 'seed0'
    with _DriverLock(d):
        s = reproduce(['alexnet-c10'], **_kw(fake))[0]
    assert (s['status'], s['error'].split(' on ')[0]) == (ELSEWHERE, f'pid {os.getpid()}')
    assert not (d / 'run.json').exists() and not (fake['log'] / 'starts.log').exists()
    from cifar_kit.run.lock import RunLock
    with RunLock(d):   # `cifar-kit train` of that folder by hand: the same
        assert reproduce(['alexnet-c10'], **_kw(fake))[0]['status'] == ELSEWHERE
    assert reproduce(['alexnet-c10'], **_kw(fake))[0]['status'] == 'done'


def test_shards_with_plan_cover_every_run_once(capsys):
    "`--plan --shard i/3`: prints each run with its GPU-hours; the three shards' runs are every run, each once"
    from cifar_kit.cli import main
    rows = ['alexnet-c10', 'vgg19_bn-c100', 'resnet110-c10', 'wrn28_10-c10']   # cheap to count on the meta device
    got = []
    for i in range(3):
        assert main(['reproduce', *rows, '--seeds', '0', '1', '2', '--plan', '--shard', f'{i}/3']) == 0
        out = capsys.readouterr().out.strip().splitlines()
        runs = [l.split()[:3] for l in out[:-1]]
        assert all(s == 'seed' and ' GPU-h ' in l for (_, s, _), l in zip(runs, out)), out
        assert out[-1].startswith(f'{len(runs)} runs: ') and 'GPU-h in all' in out[-1], out
        got += [(r, int(k)) for r, _, k in runs]
    assert sorted(got) == sorted((r, s) for r in rows for s in range(3))
    assert main(['reproduce', 'alexnet-c10', '--plan', '--shard', '3/3']) == 2
    assert '--shard takes i/n' in capsys.readouterr().err


# a pool's child that stands in for `run_one`: logs its start (row, seed, GPUs), waits, prints its summary; a SIGTERM
# ends the wait and makes the run `interrupted`, as the real child records it
_FAKE_CHILD = """import json, os, signal, sys, time
row, seed, runs = json.loads(sys.argv[1])[:3]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
with open(os.environ['FAKE_LOG'], 'a') as f: f.write(f"{row} {seed} {os.environ['CUDA_VISIBLE_DEVICES']}\\n")
for _ in range(int(os.environ['FAKE_WAIT'])):
    if got: break
    time.sleep(0.05)
print('noise'); print(json.dumps({'row': row, 'seed': seed, 'status': 'interrupted' if got else 'done', 'error': '',
    'final_test_err_pct': None, 'seed_err_pct': None, 'run_dir': runs, 'seconds': 0.0, 'signum': got[0] if got else None}))
"""


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    "The pool's children replaced by `_FAKE_CHILD`; the path of their start log"
    import cifar_kit.reproduction.driver as R
    monkeypatch.setattr(R, '_CHILD', _FAKE_CHILD)
    monkeypatch.setenv('FAKE_LOG', str(tmp_path / 'starts.log')); monkeypatch.setenv('FAKE_WAIT', '20')
    return tmp_path / 'starts.log'


POOL_ROWS = ['alexnet-c10', 'wrn28_10-c10', 'resnet110-c10']   # by FLOPs: wrn28_10 >> resnet110 >> alexnet


def test_pool_one_run_per_gpu_longest_first(fake_child, tmp_path, capsys):
    "`--gpus 0,1`: the two longest runs start first, one per GPU, each child seeing only its GPU; the short one last"
    res = reproduce(POOL_ROWS, gpus='0,1', smoke=True, runs_dir=tmp_path / 'runs')
    assert sorted((s['row'], s['status']) for s in res) == sorted((r, 'done') for r in POOL_ROWS), res
    starts = [l.split() for l in fake_child.read_text().splitlines()]
    assert sorted(r for r, _, _ in starts[:2]) == ['resnet110-c10', 'wrn28_10-c10'] and starts[2][0] == 'alexnet-c10'
    assert sorted(g for _, _, g in starts[:2]) == ['0', '1'] and starts[2][2] in ('0', '1')
    out = capsys.readouterr().out
    assert out.count('start ') == 3 and out.count(': done') == 3 and '[3/3] GPU ' in out, out


def test_pool_passes_a_signal_on_to_its_runs_and_starts_no_more(fake_child, tmp_path, monkeypatch):
    "SIGTERM to the pool (its children in sessions of their own): each running child gets it once, no third run starts"
    import signal, threading, time
    from cifar_kit.reproduction.driver import BatchInterrupted
    monkeypatch.setenv('FAKE_WAIT', '1200')   # a minute: ended by the signal
    def kill_when_both_started():   # by progress, never by the clock
        while len(fake_child.read_text().splitlines() if fake_child.exists() else []) < 2: time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=kill_when_both_started, daemon=True).start()
    with pytest.raises(BatchInterrupted) as e:
        reproduce(POOL_ROWS, gpus='0,1', smoke=True, runs_dir=tmp_path / 'runs', verbose=False)
    assert e.value.signum == signal.SIGTERM and e.value.row in ('wrn28_10-c10', 'resnet110-c10')
    assert len(fake_child.read_text().splitlines()) == 2   # alexnet-c10 never started


def test_a_pool_child_runs_the_template_on_its_gpu(fake):
    "The real child (`run_one` in a process of its own): the kernel sees only the child's GPU"
    s = reproduce(['alexnet-c10'], gpus='1', **_kw(fake))
    assert [(x['row'], x['status']) for x in s] == [('alexnet-c10', 'done')]
    assert _starts(fake) == [['alexnet-c10', '0', '1']]


def test_pool_and_slurm_user_errors(fake, monkeypatch):
    with pytest.raises(ValueError, match="--gpus takes 'all' or distinct"): reproduce(['alexnet-c10'], gpus='0,0', **_kw(fake))
    with pytest.raises(ValueError, match='not both'): reproduce(['alexnet-c10'], gpus='0', slurm=True, **_kw(fake))
    monkeypatch.setitem(sys.modules, 'submitit', None)   # not installed
    with pytest.raises(ValueError, match=r"pip install 'cifar_kit\[slurm\]'"): reproduce(['alexnet-c10'], slurm=True, **_kw(fake))
    assert not fake['runs'].exists()   # refused before anything ran


def test_submitit_local_executor_runs_two_jobs_at_once(fake, tmp_path, monkeypatch):
    "Two runs through submitit's local executor: both done, in two job processes at the same time"
    pytest.importorskip('submitit')
    monkeypatch.setenv('FAKE_TOGETHER', '2')   # each run waits for the other to start: one after the other would fail
    res = reproduce(ROWS, slurm={'cluster': 'local', 'logs': tmp_path / 'logs'}, **_kw(fake))
    assert sorted((s['row'], s['status']) for s in res) == sorted((r, 'done') for r in ROWS), res
    assert len(list((tmp_path / 'logs').glob('*_0_log.out'))) == 2   # one job each
    again = reproduce(ROWS, slurm={'cluster': 'local', 'logs': tmp_path / 'logs'}, **_kw(fake))
    assert [s['status'] for s in again] == ['skipped', 'skipped']   # done runs are not submitted
    assert len(list((tmp_path / 'logs').glob('*_0_log.out'))) == 2


def test_submitit_debug_executor_and_requeue(fake, tmp_path):
    "The debug executor runs the job in this process; a timed-out job's checkpoint resubmits the same run"
    pytest.importorskip('submitit')
    from cifar_kit.reproduction.driver import SlurmRun
    res = reproduce(['alexnet-c10'], slurm={'cluster': 'debug', 'logs': tmp_path / 'logs'}, **_kw(fake))
    assert [(s['row'], s['status']) for s in res] == [('alexnet-c10', 'done')]
    d = SlurmRun().checkpoint('alexnet-c10', 0, str(fake['runs']), True)
    assert isinstance(d.function, SlurmRun) and d.args == ('alexnet-c10', 0, str(fake['runs']), True)
    assert d.result()['status'] == 'skipped'   # the requeued job finds the run done (or resumes it)
