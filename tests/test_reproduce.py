"""Reproductions: the papermill template in smoke mode through the driver, skip / resume / failure semantics, the table
built from the records, and the notebooks' metadata (parameters tag, kernelspec)."""
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
import cifar_kit
from cifar_kit.reproduction.driver import reproduce, benchmark_rows
from cifar_kit.reproduction.table import build_table
from cifar_kit.reproduction.template import template_path, repro_root
from cifar_kit.run.files import read_record, read_history
from cli_helpers import as_at_a_terminal

ROOT = Path(__file__).resolve().parent.parent
ROWS = ['alexnet-c10', 'resnet110-c100']   # two families (plain conv net, residual net), both data sets


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory):
    "Smoke runs of two rows through the driver, once for the whole module"
    runs = tmp_path_factory.mktemp('smoke') / 'runs'
    return runs, reproduce(ROWS, seeds=[0], smoke=True, runs_dir=runs, verbose=False)


def test_smoke_runs_through_the_driver(smoke_runs):
    runs, res = smoke_runs
    assert [(s['row'], s['status']) for s in res] == [(r, 'done') for r in ROWS], res
    for row, params in zip(ROWS, (2_472_266, 1_736_564)):
        d = runs / row / 'seed0'
        rec = read_record(d)
        assert (rec['status'], rec['recipe'], rec['epochs'], rec['params'], rec['smoke']) == ('done', row, 1, params, True)
        assert rec['config']['limit_batches'] == 2 and rec['device_type'] == 'cpu'
        assert len(read_history(d / 'history.csv')) == 1
        assert {'reproduce.ipynb', 'run.json', 'history.csv', 'config.json', 'augmented.png', 'curves.png', 'last.pt'} <= {p.name for p in d.iterdir()}
        nb = nbformat.read(d / 'reproduce.ipynb', 4)
        injected = [c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', [])]
        assert len(injected) == 1 and f"recipe = \"{row}\"" in injected[0].source and 'smoke = True' in injected[0].source
        out = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
        assert 'as the recipe expects' in out and 'epoch 1/1: lr' in out, out[-2000:]


def test_finished_run_is_skipped(smoke_runs):
    runs, _ = smoke_runs
    d = runs / 'alexnet-c10' / 'seed0'
    before = (d / 'reproduce.ipynb').stat().st_mtime_ns
    s = reproduce(['alexnet-c10'], smoke=True, runs_dir=runs, verbose=False)[0]
    assert s['status'] == 'skipped'
    assert (d / 'reproduce.ipynb').stat().st_mtime_ns == before   # the notebook was not executed again


def test_unfinished_run_resumes(smoke_runs, tmp_path):
    "A run whose record is not `done` is executed again, and train resumes from its checkpoint instead of starting over"
    runs, _ = smoke_runs
    copy = tmp_path / 'runs'
    shutil.copytree(runs / 'alexnet-c10', copy / 'alexnet-c10')
    d = copy / 'alexnet-c10' / 'seed0'
    rec = read_record(d); rec['status'] = 'interrupted'; (d / 'run.json').write_text(json.dumps(rec))
    history = (d / 'history.csv').read_bytes()
    s = reproduce(['alexnet-c10'], smoke=True, runs_dir=copy, verbose=False)[0]
    assert s['status'] == 'done'
    out = '\n'.join(o.get('text', '') for c in nbformat.read(d / 'reproduce.ipynb', 4).cells if c.cell_type == 'code' for o in c.get('outputs', []))
    assert 'resuming' in out, out[-2000:]
    assert (d / 'history.csv').read_bytes() == history   # the finished epoch was not trained again (its row, seconds and all, is untouched)


def test_failed_run_is_recorded_and_the_batch_goes_on(smoke_runs, tmp_path):
    "No CIFAR files and smoke off: the run fails before training; the driver records it and runs the next row"
    runs = tmp_path / 'runs'
    empty = tmp_path / 'no-data'; empty.mkdir()
    res = reproduce(['alexnet-c10', 'alexnet-c100'], runs_dir=runs, data_dir=str(empty), device='cpu', verbose=False)
    assert [s['status'] for s in res] == ['failed', 'failed'], res
    rec = read_record(runs / 'alexnet-c10' / 'seed0')
    assert rec['status'] == 'failed' and rec['error'].startswith('FileNotFoundError') and 'cifar10 not found' in rec['error']
    assert rec['smoke'] is False and (runs / 'alexnet-c10' / 'seed0' / 'reproduce.ipynb').exists()
    # the table shows it; a smoke run copied beside it is skipped (smoke runs never sit in a real table); rows never run are marked
    shutil.copytree(smoke_runs[0] / 'resnet110-c100', runs / 'resnet110-c100')
    df = build_table(runs, tmp_path / 'table').set_index('row')
    assert df.loc['alexnet-c10', 'status'] == 'failed ×1' and df.loc['alexnet-c10', 'n'] == 0
    assert df.loc['resnet110-c100', 'status'] == 'not run' and df.loc['resnet110-c100', 'n'] == 0
    md = (tmp_path / 'table' / 'RESULTS.md').read_text()
    assert '| alexnet | `alexnet-c10` | 2.47 | 22.78 | – | – | – | – | 164 | – | failed ×1 |' in md, md
    assert md.count('| not run |') == len(benchmark_rows()) - 2 and 'smoke' not in md.split('## CIFAR-10')[1]


def test_cli_exit_codes(smoke_runs, tmp_path, monkeypatch, capsys):
    "`cifar-kit reproduce`: 0 when all done or skipped, 1 when a run failed (after the batch), 2 for a user error"
    from cifar_kit.cli import main
    import cifar_kit.reproduction.driver as R
    runs, _ = smoke_runs
    assert main(['reproduce', 'alexnet-c10', 'resnet110-c100', '--smoke', '--runs-dir', str(runs)]) == 0
    assert '2 runs: 2 skipped' in capsys.readouterr().out
    assert main(['reproduce', 'resnet-110-c10']) == 2
    err = capsys.readouterr().err; assert 'did you mean resnet110-c10' in err and err.strip().count('\n') == 0, err
    assert main(['reproduce']) == 2 and 'or pass --all' in capsys.readouterr().err
    assert main(['reproduce', 'alexnet-c10', '--seeds', '-1', '--smoke', '--runs-dir', str(tmp_path)]) == 2
    # a failed run (the kind recorded in the test above), faked here to keep the test fast: exit status 1, after every run
    calls = []
    def fake_run_one(row, seed, *a, **k):
        calls.append((row, seed))
        return {'row': row, 'seed': seed, 'status': 'failed' if seed == 0 else 'done', 'final_test_err_pct': None, 'seed_err_pct': None,
                'error': 'FileNotFoundError: cifar10 not found' if seed == 0 else '', 'run_dir': str(tmp_path), 'seconds': 0.0}
    monkeypatch.setattr(R, 'run_one', fake_run_one)
    with pytest.raises(SystemExit) as e: main(['reproduce', 'alexnet-c10', '--seeds', '0', '1', '--runs-dir', str(tmp_path / 'r')])
    assert e.value.code == 1 and calls == [('alexnet-c10', 0), ('alexnet-c10', 1)]
    out = capsys.readouterr(); assert '2 runs: 1 failed, 1 done' in out.out and 'failed: alexnet-c10 seed 0: FileNotFoundError' in out.err
    assert main(['table', '--runs-dir', str(runs), '--out-dir', str(tmp_path / 't'), '--smoke']) == 0 and (tmp_path / 't' / 'RESULTS.md').exists()


def test_committed_results_are_what_the_builder_makes_of_the_committed_records(tmp_path):
    "reproductions/RESULTS.md and results.csv, byte for byte, are the table built from the committed records"
    build_table(ROOT / 'reproductions' / 'runs', tmp_path, allow_empty=True)
    for name in ('RESULTS.md', 'results.csv'):
        assert (tmp_path / name).read_bytes() == (ROOT / 'reproductions' / name).read_bytes(), f"rerun `cifar-kit table` ({name} is stale)"
    for row in benchmark_rows(): assert f'`{row}`' in (ROOT / 'reproductions' / 'RESULTS.md').read_text()


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    (tmp_path / 'reproductions').mkdir()
    nb_path = tmp_path / 'reproductions' / 'reproduce.ipynb'
    nb = nbformat.read(template_path(), 4)
    nb.cells[1].outputs = [nbformat.v4.new_output('stream', text='x')]; nb.cells[1].execution_count = 3
    nb.cells[1].metadata['scrolled'] = True
    nbformat.write(nb, nb_path)
    shutil.copy(ROOT / 'pyproject.toml', tmp_path / 'pyproject.toml')
    r = subprocess.run([str(Path(sys.executable).parent / 'nbdev-clean'), '--fname', str(nb_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    clean = nbformat.read(nb_path, 4)
    tagged = [c for c in clean.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1 and tagged[0].source.startswith('recipe = ') and 'scrolled' not in tagged[0].metadata
    assert tagged[0].execution_count is None
    assert clean.metadata['kernelspec']['name'] == 'python3'


@pytest.mark.parametrize('path', sorted((ROOT / 'nbs').glob('*.ipynb')) + sorted((ROOT / 'reproductions').glob('*.ipynb')), ids=lambda p: p.name)
def test_kernelspec_is_python3(path):
    assert nbformat.read(path, 4).metadata.get('kernelspec', {}).get('name') == 'python3'


def test_templates_parameters():
    "The template's parameters cell is flat, one commented line each, and is the first code cell"
    nb = nbformat.read(template_path(), 4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code[0].metadata.get('tags') == ['parameters']
    lines = code[0].source.splitlines()
    assert [l.split(' =')[0] for l in lines] == ['recipe', 'seed', 'data_dir', 'out_dir', 'smoke', 'device', 'download']
    assert all('  # ' in l for l in lines)
    table = nbformat.read(ROOT / 'reproductions' / 'table.ipynb', 4)
    assert [c for c in table.cells if c.cell_type == 'code'][0].metadata.get('tags') == ['parameters']


def test_table_notebook_builds_the_same_table(smoke_runs, tmp_path):
    import papermill as pm
    runs, _ = smoke_runs
    pm.execute_notebook(str(ROOT / 'reproductions' / 'table.ipynb'), str(tmp_path / 'table.ipynb'), kernel_name='python3',
                        progress_bar=False, parameters={'runs_dir': str(runs), 'out_dir': str(tmp_path / 'nb'), 'smoke': True}, cwd=str(tmp_path))
    build_table(runs, tmp_path / 'fn', smoke=True)
    assert (tmp_path / 'nb' / 'RESULTS.md').read_text() == (tmp_path / 'fn' / 'RESULTS.md').read_text()
    assert '| done ×1 (smoke) |' in (tmp_path / 'nb' / 'RESULTS.md').read_text()


# --- records that cannot lie ---------------------------------------------------------------------------------------

def _fake_run(root, row, seed, err, epochs=None):
    "A finished run folder written by hand that checks out: history, checkpoint and the recipe's config agree with run.json"
    import torch
    from cifar_kit.run.files import write_history, atomic_write_json
    from cifar_kit.recipes import get_recipe
    from cifar_kit.config import config_from, config_dict
    d = root / row / f'seed{seed}'; d.mkdir(parents=True)
    epochs = epochs or get_recipe(row).epochs
    write_history([{'epoch': e + 1, 'test_top1': 50.0 + e * 40 / epochs} for e in range(epochs - 1)] + [{'epoch': epochs, 'test_top1': 100 - err}],
                  d / 'history.csv')
    torch.save({'epoch': epochs, 'model': {}}, d / 'last.pt')
    atomic_write_json({'status': 'done', 'recipe': row, 'seed': seed, 'epochs': epochs, 'final_test_err_pct': err, 'params': 2_472_266,
                       'wall_time_s': 60.0, 'device': 'NVIDIA H100 80GB HBM3', 'config': config_dict(config_from(row, seed=seed))}, d / 'run.json')
    return d


def _snapshot(*folders):
    "Every file under `folders`, by path, with its bytes"
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob('*')) if p.is_file()}


def _edit_record(d, **fields):
    rec = json.loads((d / 'run.json').read_text()); rec.update(fields); (d / 'run.json').write_text(json.dumps(rec))


class _Payload:
    "Writes a marker file when unpickled, as a hostile checkpoint would run code"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.write_text, (Path(self.marker), 'ran'))


def test_a_record_counts_only_when_its_run_backs_it_up(tmp_path):
    "Hand-typed or inconsistent records are unverified, listed with the reason and kept out of the mean; run folders untouched"
    import torch
    runs = tmp_path / 'runs'
    _fake_run(runs, 'alexnet-c10', 0, 22.0); _fake_run(runs, 'alexnet-c10', 1, 23.0)
    typed = _fake_run(runs, 'alexnet-c10', 2, 25.0); _edit_record(typed, final_test_err_pct=1.0)      # a better number typed in
    short = _fake_run(runs, 'alexnet-c10', 3, 20.0); torch.save({'epoch': 80, 'model': {}}, short / 'last.pt')
    gone = _fake_run(runs, 'alexnet-c10', 4, 20.0); (gone / 'last.pt').unlink()
    evil = _fake_run(runs, 'alexnet-c10', 5, 20.0); torch.save({'epoch': _Payload(tmp_path / 'ran.txt')}, evil / 'last.pt')
    fewer = _fake_run(runs, 'alexnet-c10', 6, 20.0, epochs=10)                                   # a shortened run
    moved = _fake_run(runs, 'alexnet-c10', 7, 20.0); _edit_record(moved, recipe='alexnet-c100')
    before = _snapshot(runs)
    df = build_table(runs, tmp_path / 'table').set_index('row')
    assert df.loc['alexnet-c10', 'n'] == 2 and abs(df.loc['alexnet-c10', 'ours_mean'] - 22.5) < 1e-9
    assert df.loc['alexnet-c10', 'status'] == 'done ×2, unverified ×6'
    why = df.loc['alexnet-c10', 'unverified']
    for s in ("seed 2: final_test_err_pct 1.0, history.csv's last epoch gives 25.0", 'seed 3: last.pt holds epoch 80, the record says 164',
              'seed 4: no last.pt', 'seed 5: last.pt does not load safely (UnpicklingError)', "seed 6: 10 of the recipe's 164 epochs",
              "seed 7: the record is of 'alexnet-c100'"):
        assert s in why, why
    assert not (tmp_path / 'ran.txt').exists()                                                   # the payload never ran
    md = (tmp_path / 'table' / 'RESULTS.md').read_text()
    assert '| 22.50 ± 0.71 (n=2) | fp32 | 164 |' in md and '## Unverified records' in md and 'seed 2: final_test_err_pct 1.0' in md
    assert _snapshot(runs) == before                                                             # the table never writes a run folder


@pytest.mark.parametrize('case', ['mistyped', 'empty', 'only-malformed', 'only-smoke'])
def test_table_refuses_a_runs_folder_without_records(tmp_path, capsys, case):
    "`cifar-kit table --runs-dir` without a record: one line, exit 2, and the table already written unchanged byte for byte"
    from cifar_kit.cli import main
    good, out = tmp_path / 'good', tmp_path / 'table'
    _fake_run(good, 'alexnet-c10', 0, 22.0); build_table(good, out)
    runs = tmp_path / 'runs'
    if case != 'mistyped': runs.mkdir()
    if case == 'only-malformed': (runs / 'alexnet-c10' / 'seed0').mkdir(parents=True); (runs / 'alexnet-c10' / 'seed0' / 'run.json').write_text('')
    if case == 'only-smoke': d = _fake_run(runs, 'alexnet-c10', 0, 22.0); _edit_record(d, smoke=True)
    before = _snapshot(out, runs if runs.exists() else out)
    assert main(['table', '--runs-dir', str(runs), '--out-dir', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('cifar-kit table: error: ') and 'check --runs-dir' in err[-1] and 'nothing was written' in err[-1], err
    assert len([l for l in err if not l.startswith('warning: ')]) == 1, err
    assert _snapshot(out, runs if runs.exists() else out) == before


def test_a_malformed_record_is_skipped_with_a_warning(tmp_path, capsys):
    "Empty, truncated, not an object, without its keys: each skipped with one warning line naming the file; the rest tabulated"
    from cifar_kit.cli import main
    runs = tmp_path / 'runs'
    _fake_run(runs, 'alexnet-c10', 0, 22.0)
    bad = {1: '', 2: '{"status": "done", "recipe": "alexnet-c1', 3: '[1, 2, 3]', 4: '{"status": "done", "final_test_err": 1.0}', 5: '\x00\xff'}
    for seed, text in bad.items():
        d = _fake_run(runs, 'alexnet-c10', seed, 22.0); (d / 'run.json').write_text(text)
    before = _snapshot(runs)
    assert main(['table', '--runs-dir', str(runs), '--out-dir', str(tmp_path / 't')]) == 0
    warns = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning: skipped ')]
    assert len(warns) == len(bad), warns
    for seed in bad: assert sum(f"seed{seed}/run.json" in w for w in warns) == 1, warns
    assert '| 22.00 (n=1) | fp32 | 164 |' in (tmp_path / 't' / 'RESULTS.md').read_text()
    assert _snapshot(runs) == before


def test_smoke_records_never_reach_the_committed_table(smoke_runs, tmp_path, monkeypatch, capsys):
    "However a smoke run was made or relabelled, the committed table skips it; `--smoke` into the committed folder is refused"
    import cifar_kit.reproduction.template as T, cifar_kit.reproduction.table as R
    from cifar_kit.cli import main
    repo = tmp_path / 'reproductions'; repo.mkdir()
    for m in (T, R): monkeypatch.setattr(m, 'repro_root', lambda: repo)
    runs = tmp_path / 'runs'
    _fake_run(runs, 'alexnet-c100', 0, 50.0)                                                     # one real, verified run
    shutil.copytree(smoke_runs[0] / 'alexnet-c10', runs / 'alexnet-c10')                      # the driver's smoke run
    relabelled = runs / 'resnet110-c100' / 'seed0'; shutil.copytree(smoke_runs[0] / 'resnet110-c100' / 'seed0', relabelled)
    _edit_record(relabelled, smoke=False)                                                        # mark removed: config still says 2 batches
    by_hand = _fake_run(runs, 'vgg19_bn-c10', 0, 1.0)                                            # papermill -p smoke True, mark and limit removed
    _edit_record(by_hand, config=json.loads((by_hand / 'run.json').read_text())['config'] | {'data_dir': '/tmp/cifar_kit_smoke_ab12'})
    assert main(['table', '--runs-dir', str(runs)]) == 0
    err = capsys.readouterr().err
    for d in ('alexnet-c10', 'resnet110-c100', 'vgg19_bn-c10'): assert f'{d}/seed0/run.json: a smoke run' in err, err
    md = (repo / 'RESULTS.md').read_text()
    assert '(smoke)' not in md and '| 50.00 (n=1) |' in md and md.count('| not run |') == len(benchmark_rows()) - 1, md
    before = _snapshot(repo, runs)
    assert main(['table', '--runs-dir', str(runs), '--smoke']) == 2
    assert 'never go into the committed table' in capsys.readouterr().err
    assert _snapshot(repo, runs) == before


# --- the kernel runs no code of the run folder; Ctrl-C ---------------------------------------------------------------

_PLANTED = {'torch.py': 'torch', 'cifar_kit.py': 'cifar_kit', 'ipython_config.py': 'ipython_config',
            'ipython_kernel_config.py': 'ipython_kernel_config', 'matplotlib.py': 'matplotlib'}


def test_the_kernel_runs_no_code_from_the_run_folder(smoke_runs, tmp_path, monkeypatch):
    "Modules and IPython config files left in a run folder are never imported or read; the run resumes and finishes"
    import tempfile
    runs, _ = smoke_runs
    copy = tmp_path / 'runs'; shutil.copytree(runs / 'alexnet-c10', copy / 'alexnet-c10')
    d = copy / 'alexnet-c10' / 'seed0'
    rec = read_record(d); rec['status'] = 'interrupted'; (d / 'run.json').write_text(json.dumps(rec))
    for name, tag in _PLANTED.items():
        (d / name).write_text(f"open({str(d / ('MARKER-' + tag))!r}, 'w').write('imported')\nraise SystemExit('planted {tag} ran')\n")
    kept = {p: p.read_bytes() for p in (d / 'last.pt', d / 'history.csv')}
    temp = tmp_path / 'tmp'; temp.mkdir(); monkeypatch.setattr(tempfile, 'tempdir', str(temp))
    cwd = Path.cwd()
    s = reproduce(['alexnet-c10'], smoke=True, runs_dir=copy, verbose=False)[0]
    assert s['status'] == 'done', s
    assert not list(d.glob('MARKER-*'))                                          # nothing planted ran
    assert Path.cwd() == cwd and not list(temp.glob('cifar_kit_kernel_*'))      # the kernel's folder is gone
    assert all(p.read_bytes() == b for p, b in kept.items())                     # resumed: the finished epoch kept as it was


_CTRL_C = '''
import os, signal, time
import cifar_kit.learner as L
_call = L.Learner.__call__
def _ctrl_c_after_the_first_batch(self, event):
    _call(self, event)
    if event == 'after_batch' and not getattr(L, '_sent', False):
        L._sent = True
        os.killpg(os.getpgid(os.getppid()), signal.SIGINT)   # what a terminal does on Ctrl-C: the driver's process group
        time.sleep(300)                                       # until the driver passes the interrupt on to this kernel
L.Learner.__call__ = _ctrl_c_after_the_first_batch
'''


def test_ctrl_c_ends_with_one_line_records_interrupted_and_resumes(tmp_path):
    "Ctrl-C during `cifar-kit reproduce`: one line, no traceback, exit 130, the run recorded as interrupted; the next run resumes"
    import os
    startup = tmp_path / 'ipython' / 'profile_default' / 'startup'; startup.mkdir(parents=True)
    (startup / '00-ctrl-c.py').write_text(_CTRL_C)      # signalled by progress (after the first batch), never by the clock
    runs = tmp_path / 'runs'
    env = os.environ | {'IPYTHONDIR': str(tmp_path / 'ipython'), 'PYTHONPATH': str(ROOT)}
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'reproduce', 'alexnet-c10', '--smoke', '--runs-dir', str(runs)],
                       capture_output=True, text=True, env=env, start_new_session=True, timeout=600,
                       preexec_fn=as_at_a_terminal)   # Ctrl-C's default disposition, even when the suite runs in the background
    assert r.returncode == 130, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert 'Traceback' not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    msg = 'cifar-kit reproduce: interrupted at epoch 0/1 of alexnet-c10 seed 0; rerun the same command to resume'
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines and lines[-1] == msg and r.stderr.count(msg) == 1, r.stderr   # the driver's one line, last
    assert 'KeyboardInterrupt' not in r.stderr, r.stderr   # nothing of the kernel's own interrupt on the terminal (see kernel.log)
    # not "nothing else at all on stderr": what asyncio, zmq or jupyter_client log while an interrupted kernel shuts down
    # depends on timing and load, not on the kit
    d = runs / 'alexnet-c10' / 'seed0'
    assert read_record(d)['status'] == 'interrupted' and read_record(d)['smoke'] is True
    assert (d / 'kernel.log').is_file()   # the kernel's own log ("KeyboardInterrupt caught in kernel") goes there, off the terminal
    s = reproduce(['alexnet-c10'], smoke=True, runs_dir=runs, verbose=False)[0]
    assert s['status'] == 'done' and read_record(d)['status'] == 'done' and len(read_history(d / 'history.csv')) == 1
