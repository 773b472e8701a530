"""The package face: imports run downward, the families register themselves, and importing the kit stays cheap."""
import ast, importlib.util, json, pkgutil, statistics, subprocess, sys
from pathlib import Path
import pytest
import cifar_kit, cifar_kit.models
from cifar_kit.core import MODELS, list_models

PKG = Path(cifar_kit.__file__).parent
ROOT = PKG.parent
NOT_FAMILIES = {'layers', 'seed'}   # modules of cifar_kit.models that register no model: building blocks, seed checkpoints
HEAVY = ('matplotlib', 'ipywidgets', 'tqdm', 'torchmetrics', 'pandas')

def _imports(path:Path):
    "(module, names, level) of every import statement in the file at `path`; `import a.b` gives ('a.b', [None], 0)"
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import): yield from ((a.name, [a.asname], 0) for a in n.names)
        elif isinstance(n, ast.ImportFrom): yield n.module, [a.name for a in n.names], n.level

def _face_imports(rel:Path)->list[str]:
    "Imports of the package face in module `rel` (a path inside the package): `import cifar_kit`, `from cifar_kit import x`"
    submodules = {m.name for m in pkgutil.iter_modules([str(PKG)])}
    bad = []
    for mod, names, level in _imports(PKG/rel):
        if level == 0 and names and mod and (mod == 'cifar_kit' or mod.startswith('cifar_kit.')) and names == [None]:
            bad.append(f'import {mod}')   # binds the name cifar_kit: the face
        target = mod if level == 0 else '.'.join(['cifar_kit', *rel.parent.parts][:len(rel.parts) - level + 1] + ([mod] if mod else []))
        if target == 'cifar_kit' and any(n not in submodules for n in names if n):
            bad.append(f"from {'.' * level or 'cifar_kit'} import {', '.join(names)}")
    return bad

def test_no_module_imports_the_package_face():
    mods = [f.relative_to(PKG) for f in sorted(PKG.rglob('*.py'))]
    bad = {str(m): b for m in mods if m not in (Path('__init__.py'), Path('_modidx.py')) for b in [_face_imports(m)] if b}
    assert bad == {}
    assert _face_imports(Path('__init__.py')) == []   # the face itself imports only modules of the package

def test_every_family_registers_and_nothing_else_does():
    families = {m.name for m in pkgutil.iter_modules(cifar_kit.models.__path__)} - NOT_FAMILIES
    by_module = {}
    for name in list_models(): by_module.setdefault(MODELS[name].__module__, set()).add(name)
    assert set(by_module) == {f'cifar_kit.models.{f}' for f in families}   # each family registers at least one model
    assert set().union(*by_module.values()) == set(list_models())          # and the registry is exactly their union
    assert all(by_module.values())

def test_models_package_imports_every_family_and_the_face_names_none():
    families = {m.name for m in pkgutil.iter_modules(cifar_kit.models.__path__)} - NOT_FAMILIES
    imported = {n for mod, names, level in _imports(PKG/'models'/'__init__.py') if level == 1 and mod is None for n in names}
    assert imported == families
    face = [(mod, names) for mod, names, level in _imports(PKG/'__init__.py')]
    assert (None, ['models']) in face   # `from . import models`
    assert not any(mod and mod.startswith('models.') and mod.split('.')[1] in families for mod, _ in face), face

def _modules_after(code:str)->set[str]:
    "Top-level names in `sys.modules` after running `code` in a fresh interpreter"
    code += '\nimport sys, json; print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))'
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(json.loads(p.stdout.strip().splitlines()[-1]))

@pytest.fixture(scope='module')
def baseline_modules():
    "What torch and torchvision import by themselves (torch imports tqdm, for one)"
    return _modules_after(f'import runpy; _shim = runpy.run_path({str(PKG/"_tvcompat.py")!r}); import torch, torchvision')

@pytest.mark.parametrize('code', ['import cifar_kit', 'import cifar_kit.cli'])
def test_import_loads_no_heavy_library(code, baseline_modules):
    mods = _modules_after(code)
    assert {'cifar_kit', 'torch', 'torchvision'} <= mods
    assert [m for m in HEAVY if m in mods - baseline_modules] == []
    assert [m for m in ('matplotlib', 'ipywidgets', 'torchmetrics', 'pandas') if m in mods] == []

def test_heavy_names_still_work():
    assert callable(cifar_kit.LivePlotCB) and callable(cifar_kit.plot_block_stats) and callable(cifar_kit.model_explorer)
    mods = _modules_after("from cifar_kit.callbacks import plot_history\nplot_history([{'epoch': 1, 'train_loss': 1.0, 'train_top1': 50.0}])")
    assert 'matplotlib' in mods   # imported on first use

def _startup_module():
    spec = importlib.util.spec_from_file_location('startup', ROOT/'benchmarks'/'startup.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

def test_startup_benchmark_interleaves_commands():
    s = _startup_module()
    order = []
    t = s.measure({'a': [sys.executable, '-c', 'pass'], 'b': [sys.executable, '-c', 'pass']}, rounds=2, log=order.append)
    assert [len(v) for v in t.values()] == [2, 2] and all(x > 0 for v in t.values() for x in v) and len(order) == 2

def test_recorded_startup_ratios_meet_targets():
    recs = sorted((ROOT/'benchmarks'/'results').glob('startup-cpu-*.json'))
    assert recs, 'no startup record: run python benchmarks/startup.py'
    r = json.loads(recs[-1].read_text())
    assert r['rounds'] >= 5 and all(len(v) == r['rounds'] for v in r['seconds'].values())
    med = {k: statistics.median(v) for k, v in r['seconds'].items()}
    for k, target in r['targets'].items():
        ratio = med[k] / med['import_torch_torchvision']
        assert ratio == pytest.approx(r['ratios'][k], rel=1e-9)
        assert ratio <= target, (k, ratio, target)
    assert r['targets'] == {'import_cifar_kit': 1.3, 'cli_help': 1.5}
