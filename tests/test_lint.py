"""The package reads at one width: ruff (its rules in pyproject.toml's [tool.ruff]) finds nothing in cifar_kit/. The one
exception is the first line of the `__all__` that nbdev writes: it wraps the list at 120 columns and then puts
`__all__ = ` in front, so that line can reach 130. A finding in the package is fixed in its notebook, then exported."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff():
    exe = shutil.which('ruff', path=str(Path(sys.executable).parent)) or shutil.which('ruff')
    if exe is None: pytest.skip('ruff is not installed (pip install -e ".[dev]")')
    return exe


def findings(path=ROOT/'cifar_kit'):
    "ruff's findings in `path`, less nbdev's own `__all__` line"
    r = subprocess.run([_ruff(), 'check', '--config', str(ROOT/'pyproject.toml'), '--output-format', 'json', '--quiet', str(path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    out = []
    for f in json.loads(r.stdout or '[]'):
        line = Path(f['filename']).read_text().splitlines()[f['location']['row'] - 1]
        if f['code'] == 'E501' and line.startswith('__all__ = [') and len(line) <= 130: continue
        out.append(f"{Path(f['filename']).name}:{f['location']['row']}: {f['code']} {f['message']}")
    return out


def test_the_package_is_clean():
    found = findings()
    assert not found, f"{len(found)} findings (fix them in the notebooks, then nbdev-export):\n" + '\n'.join(found[:40])


def test_the_check_can_fail(tmp_path):
    "A long line, an unused import and an undefined name are each found, with the checkout's config"
    bad = tmp_path/'probe.py'
    bad.write_text('import os\nx = ' + repr('a' * 130) + '\ny = undefined_name\n__all__ = [' + "'b', " * 22 + "'c']\n")
    codes = sorted(f.split(': ')[1].split()[0] for f in findings(bad))
    assert codes == ['E501', 'F401', 'F821'], codes   # the __all__ line (under 130) is nbdev's, not a finding
