"""Reproductions: the papermill template in smoke mode through the driver, skip / resume / failure semantics, the table
built from the records, and the notebooks' metadata (parameters tag, kernelspec)."""
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
import cifar_kit
from cifar_kit.reproduce import reproduce, build_table, read_record, benchmark_rows, template_path, repro_root
from cifar_kit.callbacks import read_history

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
    # the table shows it, and the smoke rows beside it; rows never run are marked
    shutil.copytree(smoke_runs[0] / 'resnet110-c100', runs / 'resnet110-c100')
    df = build_table(runs, tmp_path / 'table').set_index('row')
    assert df.loc['alexnet-c10', 'status'] == 'failed ×1' and df.loc['alexnet-c10', 'n'] == 0
    assert df.loc['resnet110-c100', 'status'] == 'done ×1 (smoke)' and df.loc['resnet110-c100', 'n'] == 1
    md = (tmp_path / 'table' / 'RESULTS.md').read_text()
    assert '| alexnet | `alexnet-c10` | 2.47 | 22.78 | – | 164 | – | failed ×1 |' in md, md
    assert md.count('| not run |') == len(benchmark_rows()) - 3 and 'smoke runs' in md


def test_cli_exit_codes(smoke_runs, tmp_path, monkeypatch, capsys):
    "`cifar-kit reproduce`: 0 when all done or skipped, 1 when a run failed (after the batch), 2 for a user error"
    from cifar_kit.cli import main
    import cifar_kit.reproduce as R
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
        return {'row': row, 'seed': seed, 'status': 'failed' if seed == 0 else 'done', 'final_test_err': None, 'seed_err': None,
                'error': 'FileNotFoundError: cifar10 not found' if seed == 0 else '', 'run_dir': str(tmp_path), 'seconds': 0.0}
    monkeypatch.setattr(R, 'run_one', fake_run_one)
    with pytest.raises(SystemExit) as e: main(['reproduce', 'alexnet-c10', '--seeds', '0', '1', '--runs-dir', str(tmp_path / 'r')])
    assert e.value.code == 1 and calls == [('alexnet-c10', 0), ('alexnet-c10', 1)]
    out = capsys.readouterr(); assert '2 runs: 1 failed, 1 done' in out.out and 'failed: alexnet-c10 seed 0: FileNotFoundError' in out.err
    assert main(['table', '--runs-dir', str(runs), '--out-dir', str(tmp_path / 't')]) == 0 and (tmp_path / 't' / 'RESULTS.md').exists()


def test_committed_results_show_every_row_not_run_or_recorded():
    "reproductions/RESULTS.md is what the table builder makes of the committed records (none yet: every row not run)"
    md = (ROOT / 'reproductions' / 'RESULTS.md').read_text()
    runs = ROOT / 'reproductions' / 'runs'
    if not any(runs.glob('*/seed*/run.json')): assert md.count('| not run |') == len(benchmark_rows())
    for row in benchmark_rows(): assert f'`{row}`' in md


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
                        progress_bar=False, parameters={'runs_dir': str(runs), 'out_dir': str(tmp_path / 'nb')}, cwd=str(tmp_path))
    build_table(runs, tmp_path / 'fn')
    assert (tmp_path / 'nb' / 'RESULTS.md').read_text() == (tmp_path / 'fn' / 'RESULTS.md').read_text()
    assert '| done ×1 (smoke) |' in (tmp_path / 'nb' / 'RESULTS.md').read_text()
