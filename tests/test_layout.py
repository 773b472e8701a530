"""The package's layout: lessons at the top, machinery in wings, every module in a layer, imports only downward (lazy ones
included), no cycle, no module over 500 lines, and the package face a re-export that no module imports."""
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parent.parent / 'cifar_kit'
MAX_LINES = 500

# Lowest first. A module may import modules of its own layer or of layers below it, never above.
LAYERS = [
    ['_tvcompat'],
    ['run.disk'],                                         # the run wing: safe reads and writes, a run folder's files,
    ['run.files'],                                        # its lock, signals, processes
    ['run.lock', 'run.signals', 'run.distributed'],
    ['run'],
    ['pretrained'],
    ['core'],                                             # the model registry, devices, seeds
    ['models.layers'],                                    # the architectures: a lesson each
    ['models.resnet', 'models.preresnet', 'models.wrn', 'models.resnext', 'models.densenet', 'models.vgg',
     'models.alexnet', 'models.imagenet', 'models.airbench'],
    ['models.seed', 'models'],
    ['data.registry'],                                    # the data wing: registry, readers, feeders, augmentation
    ['data.readers', 'data.more_readers', 'data.feeders', 'data.augment', 'data.policies'],
    ['data'],
    ['learner'],                                          # the lessons: the loop and what is built on it
    ['recipes'],
    ['config'],
    ['loaders'],
    ['evaluate', 'callbacks'],
    ['fast'],                                             # airbench's training parts, used by train
    ['train'],
    ['record', 'distill', 'hub', 'widgets'],
    ['instruments.probe'],                                # the instruments wing: CKA, probes, collapse, sharpness, feature KD
    ['instruments.similarity', 'instruments.collapse', 'instruments.sharpness', 'instruments.feature_kd'],
    ['instruments'],
    ['reproduction.template'],                            # the reproduction wing: driver, audit, table, ablation
    ['reproduction.driver', 'reproduction.audit', 'reproduction.ablation'],
    ['reproduction.table'],
    ['reproduction'],
    ['cli'],                                              # the commands and the face
    ['__main__'],
    ['__init__'],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
WINGS = ('run', 'data', 'reproduction', 'instruments')


def modules():
    "Every module of the package by dotted name ('models.resnet'; a package's __init__ by the package's name)"
    out = {}
    for p in sorted(PKG.rglob('*.py')):
        rel = p.relative_to(PKG).with_suffix('')
        if rel.name == '_modidx': continue
        parts = rel.parts[:-1] if rel.name == '__init__' and len(rel.parts) > 1 else rel.parts
        out['.'.join(parts)] = p
    return out


def imports(name, path):
    "The package's modules that `path` imports anywhere in its body (module level or inside functions)"
    pkg = name.split('.')[:-1] if path.name != '__init__.py' or name == '__init__' else name.split('.')
    if name == '__init__': pkg = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
                mod = '.'.join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split('.')[0] == 'cifar_kit': mod = node.module[len('cifar_kit') + 1:]
            else: continue
            targets = [mod] if node.module else []
            targets += [f'{mod}.{a.name}' if mod else a.name for a in node.names]   # `from . import resnet` imports a module
            found |= {t if t else '__init__' for t in targets}
        elif isinstance(node, ast.Import):
            found |= {a.name[len('cifar_kit') + 1:] or '__init__' for a in node.names if a.name.split('.')[0] == 'cifar_kit'}
    mods = modules()
    return {m if m in mods else '__init__' if m == '' else m for m in found if m in mods or m == ''} - {name}


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(RANK))
    assert not missing, f"place these modules in a layer of LAYERS: {missing}"


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize('name', sorted(modules()))
def test_imports_run_downward(name):
    up = sorted(m for m in imports(name, modules()[name]) if RANK.get(m, -1) > RANK[name])
    assert not up, f"{name} imports {up} from a layer above it"


def test_no_module_imports_the_package_face():
    offenders = sorted(m for m, p in modules().items() if m != '__init__' and '__init__' in imports(m, p))
    assert not offenders, offenders


def test_no_import_cycle():
    graph = {m: imports(m, p) for m, p in modules().items()}
    state = {}
    def visit(m, path):
        if state.get(m) == 'done': return
        assert state.get(m) != 'open', f"import cycle: {' -> '.join(path + [m])}"
        state[m] = 'open'
        for n in graph.get(m, ()): visit(n, path + [m])
        state[m] = 'done'
    for m in graph: visit(m, [])


def test_the_wings_are_packages_and_the_lessons_are_at_the_top():
    for w in WINGS: assert (PKG/w/'__init__.py').is_file(), w
    top = {p.stem for p in PKG.glob('*.py')}
    assert {'learner', 'callbacks', 'recipes', 'train', 'evaluate', 'distill', 'record'} <= top
    assert not top & {'runfiles', 'reproduce', 'distributed', 'ablation', 'augment', 'policies', 'data'}, top


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    "The check can fail: a low module that imports one above it is found"
    (tmp_path/'core.py').write_text('def f():\n    from .train import train\n')
    assert 'train' in imports('core', tmp_path/'core.py')
