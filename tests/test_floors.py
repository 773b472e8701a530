"""The declared dependency ranges: every runtime dependency has a floor (`make floors` installs the floors and runs a
smoke subset of the suite on them), and the tested pins of constraints.txt lie inside every range pyproject.toml
declares, the extras' too, so that `make install` installs versions the project says it supports."""
import importlib.util, re, tomllib
from pathlib import Path
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _floors_module():
    spec = importlib.util.spec_from_file_location('cifar_kit_floors', ROOT/'tests'/'floors.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_every_runtime_dependency_has_a_floor():
    fl = _floors_module().floors()
    deps = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['dependencies']
    assert sorted(fl) == sorted(Requirement(d).name.lower() for d in deps)
    # the CLI's parsers need fastcore's anno_parser with pos= (2.1.7) and **settings left out (2.2.18): 1.8.9 crashed
    assert Version(fl['fastcore']) >= Version('2.2.18'), fl['fastcore']


def test_floors_refuses_a_dependency_without_one(tmp_path):
    (tmp_path/'pyproject.toml').write_text('[project]\ndependencies = ["torch>=2.4", "numpy"]\n')
    with pytest.raises(SystemExit, match="'numpy' in pyproject.toml has no `>=` floor"):
        _floors_module().floors(tmp_path/'pyproject.toml')


def test_tested_pins_lie_inside_the_declared_ranges():
    pins = dict(re.findall(r'^([A-Za-z0-9_.-]+)==(\S+)', (ROOT/'constraints.txt').read_text(), re.M))
    pins = {k.lower().replace('_', '-'): v for k, v in pins.items()}
    proj = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']
    reqs = proj['dependencies'] + [r for extra in proj['optional-dependencies'].values() for r in extra]
    outside = []
    for r in map(Requirement, reqs):
        v = pins.get(r.name.lower().replace('_', '-'))
        if v is not None and not r.specifier.contains(v.split('+')[0], prereleases=True): outside.append(f"{r} (pinned {v})")
    assert not outside, f"constraints.txt pins versions pyproject.toml excludes: {outside}"
