"Real learning on real images, through the command line a user would type."
import json, subprocess, sys
from pathlib import Path


def test_resnet20_learns_digits_on_cpu(tmp_path):
    "`cifar-kit train --arch resnet20 --dataset digits` (the demo recipe) reaches >= 97% test accuracy on the CPU"
    run_dir = tmp_path / 'run'
    out = subprocess.run([sys.executable, '-m', 'cifar_kit', 'train', '--arch', 'resnet20', '--dataset', 'digits',
                          '--device', 'cpu', '--progress', 'off', '--out-dir', str(run_dir)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads((run_dir / 'run.json').read_text())
    assert rec['status'] == 'done' and rec['recipe'] == 'resnet20-digits' and rec['epochs'] == 12
    assert rec['params'] == 272_474
    assert 100 - rec['final_test_err_pct'] >= 97.0, rec
    assert (run_dir / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    lines = (run_dir / 'history.csv').read_text().splitlines()
    assert [l.split(',')[0] for l in lines[1:]] == [str(e) for e in range(1, 13)]
    assert 'final test error' in out.stdout
