"""The kit as a `pip install` user gets it: a non-editable install in a fresh virtualenv (built from a copy of this checkout) carries
the reproduction template, and `cifar-kit reproduce --smoke` runs from it with no checkout in sight."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP_ANYWHERE = shutil.ignore_patterns('.git', '.venv', '__pycache__', '*.egg-info', 'build', 'dist', 'artifacts', '*.pt')


def SKIP(folder, names):
    "What the copy leaves out: caches and builds anywhere; the data and runs folders of the checkout's root only (not cifar_kit/data/)"
    return set(_SKIP_ANYWHERE(folder, names)) | ({'runs', 'data'} & set(names) if Path(folder) == ROOT else set())


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    "A fresh virtualenv with cifar_kit installed from a wheel of this checkout (its dependencies read from the running Python's)"
    import sysconfig
    tmp = tmp_path_factory.mktemp('install')
    src, venv = tmp/'src', tmp/'venv'
    shutil.copytree(ROOT, src, ignore=SKIP)   # pip builds in the source folder: never in the checkout itself
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    site = next((venv/'lib').glob('python*/site-packages'))
    (site/'_dependencies.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')   # torch & co. without reinstalling them;
    # a path added by a .pth line has its own .pth files ignored, so the checkout's editable install is not seen
    r = subprocess.run([sys.executable, '-m', 'pip', '--python', str(venv/'bin'/'python'), 'install', '--quiet', '--no-deps',
                        '--no-build-isolation', '--no-index', '--disable-pip-version-check', str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(src)   # nothing of the source tree is left to find
    return tmp, venv, site


def _env(venv:Path)->dict:
    "The environment of a user working in `venv` with no checkout on the path"
    env = {k: v for k, v in os.environ.items() if not k.startswith('CIFAR_KIT_') and k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    return env | {'PATH': f"{venv/'bin'}{os.pathsep}{env.get('PATH', '')}", 'OMP_NUM_THREADS': '1'}


def test_the_wheel_carries_the_template(installed):
    tmp, venv, site = installed
    assert (site/'cifar_kit'/'templates'/'reproduce.ipynb').is_file()
    assert not (site/'reproductions').exists()
    code = 'import cifar_kit; from cifar_kit.reproduction.template import template_path; print(cifar_kit.__file__); print(template_path())'
    out = subprocess.run([str(venv/'bin'/'python'), '-c', code], capture_output=True, text=True, cwd=tmp, env=_env(venv), check=True).stdout.split()
    assert out == [str(site/'cifar_kit'/'__init__.py'), str(site/'cifar_kit'/'templates'/'reproduce.ipynb')]


def test_reproduce_smoke_from_an_installed_kit(installed):
    tmp, venv, site = installed
    work = tmp/'work'; work.mkdir()
    script = venv/'bin'/'cifar-kit'   # the console script the install wrote
    assert script.is_file()
    r = subprocess.run([str(script), 'reproduce', 'alexnet-c10', '--smoke', '--runs-dir', 'runs'],
                       capture_output=True, text=True, cwd=work, env=_env(venv))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    d = work/'runs'/'alexnet-c10'/'seed0'
    rec = json.loads((d/'run.json').read_text())
    assert (rec['status'], rec['smoke'], rec['epochs'], rec['precision']) == ('done', True, 1, 'fp32'), rec
    assert rec['final_test_err_pct'] is not None and '1 run: 1 done' in r.stdout
    nb = nbformat.read(d/'reproduce.ipynb', 4)   # the executed copy of the installed template
    assert [c for c in nb.cells if c.cell_type == 'code'][0].metadata.get('tags') == ['parameters']


def test_the_committed_template_is_clean():
    "The template in the package has no outputs or execution counts (nbdev-clean leaves it so)"
    nb = nbformat.read(ROOT/'cifar_kit'/'templates'/'reproduce.ipynb', 4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata['kernelspec']['name'] == 'python3'
