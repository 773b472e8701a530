"""Start-up time of the kit: `import cifar_kit` and `cifar-kit --help` against `import torch, torchvision`.

Each command runs in a fresh interpreter, the three interleaved round after round (so a busy moment on the machine
hits all three alike), after one warm-up round that fills the file cache. The record keeps every time, the medians
and the two ratios with their targets:

    import cifar_kit  <= 1.3 x  import torch, torchvision
    cifar-kit --help  <= 1.5 x  import torch, torchvision

Where torchvision's compiled operators cannot load next to the installed torch (a CPU-only torch with PyPI's CUDA
torchvision), plain `import torchvision` fails; the baseline then runs the kit's shim file first, by path, without
importing the kit (the record says so). Usage:

    python benchmarks/startup.py                 # 9 rounds; writes benchmarks/results/startup-cpu-<date>.json
    python benchmarks/startup.py --rounds 5 --out /tmp/startup.json
"""
import argparse, datetime, json, os, platform, shutil, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT/'cifar_kit'/'_tvcompat.py'
TARGETS = {'import_cifar_kit': 1.3, 'cli_help': 1.5}   # at most this many times the baseline

def baseline_code()->tuple[str, str]:
    "Python code for `import torch, torchvision`, and a note when the shim has to run first on this machine"
    plain = 'import torch, torchvision'
    if subprocess.run([sys.executable, '-c', plain], capture_output=True).returncode == 0: return plain, ''
    shim = f'import runpy; _shim = runpy.run_path({str(SHIM.relative_to(ROOT))!r}); import torch, torchvision'   # run in ROOT
    return shim, "torchvision cannot import here on its own: the baseline runs cifar_kit/_tvcompat.py by path first"

def cli_command()->list[str]:
    "The `cifar-kit` console script next to this interpreter, else `python -m cifar_kit`"
    exe = shutil.which('cifar-kit', path=str(Path(sys.executable).parent))
    return [exe, '--help'] if exe else [sys.executable, '-m', 'cifar_kit', '--help']

def run_once(cmd:list[str])->float:
    "Wall seconds of one run of `cmd` in a fresh process; a failing command is an error"
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if p.returncode: raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return dt

def measure(cmds:dict, rounds:int, log=print)->dict:
    "Interleaved runs of every command in `cmds`, the order rotating each round; one warm-up round first"
    for cmd in cmds.values(): run_once(cmd)
    times, names = {k: [] for k in cmds}, list(cmds)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order: times[k].append(run_once(cmds[k]))
        log(f"round {r+1}/{rounds}: " + ', '.join(f'{k} {times[k][-1]:.2f}s' for k in names))
    return times

def shown(cmd:list[str])->str:
    "`cmd` as a reader would type it in the checkout: `python`, `cifar-kit`, quoted code"
    exe = Path(cmd[0]).name
    return ' '.join(['python' if exe.startswith('python') else exe] + [f'"{a}"' if ' ' in a else a for a in cmd[1:]])

def git_commit()->str:
    try: return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError: return ''

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=9, help='interleaved rounds (default 9)')
    ap.add_argument('--out', help='output JSON (default benchmarks/results/startup-cpu-<date>.json)')
    a = ap.parse_args(argv)
    base, note = baseline_code()
    cmds = {'import_torch_torchvision': [sys.executable, '-c', base],
            'import_cifar_kit': [sys.executable, '-c', 'import cifar_kit'],
            'cli_help': cli_command()}
    load0 = os.getloadavg()
    times = measure(cmds, a.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med['import_torch_torchvision'] for k in TARGETS}
    rec = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
           'command': 'python benchmarks/startup.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
           'git_commit': git_commit(), 'baseline_note': note,
           'machine': {'platform': platform.platform(), 'python': platform.python_version(), 'cpu_count': os.cpu_count(),
                       'loadavg_start': load0, 'loadavg_end': os.getloadavg(),
                       'env': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY')}},
           'commands': {k: shown(v) for k, v in cmds.items()}, 'rounds': a.rounds, 'seconds': times,
           'median_seconds': med, 'ratios': ratios, 'targets': TARGETS,
           'meets_targets': {k: ratios[k] <= TARGETS[k] for k in TARGETS}}
    out = Path(a.out) if a.out else ROOT/'benchmarks'/'results'/f"startup-cpu-{rec['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + '\n')
    for k in TARGETS: print(f"{k}: {med[k]:.2f}s = {ratios[k]:.2f} x baseline {med['import_torch_torchvision']:.2f}s (target <= {TARGETS[k]})")
    print(f"wrote {out}")
    return rec

if __name__ == '__main__': main()
