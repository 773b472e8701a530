"""README.md's generated tables (the benchmark table and the list of notebooks) are what the generator makes now from the
committed records and notebooks; `cifar-kit table --readme` rewrites them and nothing else."""
import json, shutil
from pathlib import Path
import pytest
import cifar_kit
from cifar_kit.reproduction.table import readme_tables, update_readme, sync_block
from cifar_kit.reproduction.template import repro_root

ROOT = Path(__file__).resolve().parent.parent
FIX = "rerun `cifar-kit table --readme` and commit README.md"


def _block(text, name):
    start, end = f'<!-- {name} -->\n', f'\n<!-- /{name} -->'
    assert text.count(start) == 1 and text.count(end) == 1, f'README.md must hold one <!-- {name} --> block'
    return text[text.index(start) + len(start):text.index(end)]


@pytest.mark.parametrize('name', ['results', 'notebooks'])
def test_readme_tables_are_current(name):
    "Each generated block of README.md equals what the generator makes from reproductions/runs and nbs/ now"
    assert repro_root() == ROOT / 'reproductions'
    assert _block((ROOT / 'README.md').read_text(), name) == readme_tables()[name], f"README.md's {name} table is stale: {FIX}"


def test_every_notebook_is_listed_with_its_subtitle():
    "Every notebook, in nbs/ and in the wings' folders, is a row of the README's list, which says what its subtitle says"
    root = ROOT / 'nbs'
    nbs = {p.relative_to(root).with_suffix('').as_posix() for p in root.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts} - {'index'}
    assert {'04_resnet', 'data/01_registry', 'run/01_files', 'reproduction/04_table'} <= nbs
    listed = _block((ROOT / 'README.md').read_text(), 'notebooks')
    for nb in nbs: assert f'[`{nb}`](nbs/{nb}.ipynb)' in listed, f'{nb} is missing from README.md: {FIX}'
    assert '| `models.resnet` | The residual networks for CIFAR of He et al.' in listed


def test_a_committed_record_shows_in_the_readme_and_only_the_blocks_change(tmp_path):
    "With a (verified) record among the runs, the README's results block shows it; every byte outside the blocks is kept"
    from test_reproduce import _fake_run
    runs = tmp_path / 'runs'; _fake_run(runs, 'alexnet-c10', 0, 22.0)
    readme = tmp_path / 'README.md'; shutil.copy(ROOT / 'README.md', readme)
    old = readme.read_text()
    assert update_readme(readme, runs) is True and update_readme(readme, runs) is False
    new = readme.read_text()
    assert '| alexnet | CIFAR-10 | `alexnet-c10` | 2.47 | 22.78 | – | 22.00 (n=1) | fp32 | done ×1 |' in _block(new, 'results')
    outside = lambda t: sync_block(sync_block(t, 'results', ''), 'notebooks', '')
    assert outside(new) == outside(old)


def test_table_readme_rewrites_the_checkouts_readme(tmp_path, monkeypatch, capsys):
    "`cifar-kit table --readme` rewrites a stale README (here a copy of the checkout) and refuses other records"
    import cifar_kit.reproduction.template as T, cifar_kit.reproduction.table as R
    from cifar_kit.cli import main
    (tmp_path / 'reproductions').mkdir(); shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs')
    text = (ROOT / 'README.md').read_text()
    (tmp_path / 'README.md').write_text(sync_block(text, 'notebooks', '| stale |'))
    for m in (T, R): monkeypatch.setattr(m, 'repro_root', lambda: tmp_path / 'reproductions')   # each module's own name
    assert main(['table', '--readme']) == 0 and 'rewrote' in capsys.readouterr().out
    assert (tmp_path / 'README.md').read_text() == text
    assert main(['table', '--readme']) == 0 and 'up to date' in capsys.readouterr().out
    assert main(['table', '--readme', '--runs-dir', str(tmp_path)]) == 2 and 'drop --runs-dir' in capsys.readouterr().err


def test_readme_and_the_landing_notebook_promise_the_same():
    "README.md is the landing notebook's page for GitHub: its list of what the kit does is the notebook's, word for word"
    import json
    root = Path(__file__).resolve().parents[1]
    readme = (root/'README.md').read_text()
    bullets = lambda s: s[s.index('- **Every architecture'):].split('\n\n')[0].strip()
    cells = [''.join(c['source']) for c in json.loads((root/'nbs'/'index.ipynb').read_text())['cells'] if c['cell_type'] == 'markdown']
    assert bullets(next(c for c in cells if '- **Every architecture' in c)) == bullets(readme)
