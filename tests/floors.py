"""`make floors`: install the lowest version of every dependency pyproject.toml declares into a fresh venv, and run a
smoke subset of the suite there. A floor the kit does not run on is a floor that lies.

    python tests/floors.py [--venv .venv-floors] [--keep]

Every floor resolves normally, pinned by a constraints file written from pyproject.toml. PyPI's torch wheels for Linux
are CUDA builds that load the CUDA runtime wheels when torch is imported, even on a machine without a GPU, so the venv
takes those too (about 3 GB, once: `--keep` reuses it)."""
import argparse, re, shutil, subprocess, sys, tomllib, venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the smoke subset needs besides the kit's own dependencies (latest: they are test tools, not floors)
TEST_TOOLS = ['pytest']
# The smoke subset: models against the seed's state dicts, data readers, the CLI, a short training run and resume.
SMOKE = ['tests/test_models.py', 'tests/test_datasets.py', 'tests/test_cli.py', 'tests/test_training.py',
         'tests/test_runfiles.py']


def floors(pyproject:Path=ROOT/'pyproject.toml')->dict[str, str]:
    "The lowest version each runtime dependency declares: {'torch': '2.4', ...}"
    out = {}
    for dep in tomllib.loads(pyproject.read_text())['project']['dependencies']:
        m = re.fullmatch(r'\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*(?:,.*)?', dep)
        if not m: sys.exit(f"floors: {dep!r} in pyproject.toml has no `>=` floor; give every dependency one")
        out[m[1].lower()] = m[2]
    return out


def pip(py:Path, *args:str, wheels_only:bool=True):
    cmd = [str(py), '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
           *(['--only-binary', ':all:'] if wheels_only else []), *args]
    print('+', ' '.join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--venv', default=str(ROOT/'.venv-floors'), help='the venv to make (replaced if it exists)')
    ap.add_argument('--keep', action='store_true', help='reuse the venv if it exists (skips the installs)')
    a = ap.parse_args()
    env = Path(a.venv); py = env/'bin'/'python'; fl = floors()
    if not (a.keep and py.exists()):
        if env.is_symlink(): sys.exit(f"floors: {env} is a symlink; pass --venv with a plain folder")
        shutil.rmtree(env, ignore_errors=True)
        venv.create(env, with_pip=True)
        pins = env/'floors.txt'
        pins.write_text(''.join(f'{n}=={v}\n' for n, v in fl.items()))
        pip(py, '-c', str(pins), *(f'{n}=={v}' for n, v in fl.items()), *TEST_TOOLS)
        pip(py, '--no-deps', '-e', str(ROOT), wheels_only=False)
    freeze = subprocess.run([str(py), '-m', 'pip', 'freeze'], capture_output=True, text=True).stdout.lower()
    for n, v in fl.items():   # the venv really holds each floor
        got = re.search(rf'^{re.escape(n).replace("_", "[-_]")}==([^\s]+)', freeze, re.M)
        if not got or not (got[1] == v or got[1].startswith(v + '.') or got[1].startswith(v + '+')):
            sys.exit(f"floors: {n} is {got[1] if got else 'missing'} in {env}, not the floor {v}")
    print('floors:', ', '.join(f'{n} {v}' for n, v in fl.items()), flush=True)
    r = subprocess.run([str(py), '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *SMOKE], cwd=ROOT)
    sys.exit(r.returncode)


if __name__ == '__main__': main()
