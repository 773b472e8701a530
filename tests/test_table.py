"""The like-for-like table: from hand-made run folders with known numbers, the seed's best-test-epoch error stands beside
ours of the same kind, `ours − seed` subtracts those two, the final-epoch error stays the headline, and bf16 is marked."""
import json
from pathlib import Path
import pytest
import torch
from cifar_kit.recipes import get_recipe
from cifar_kit.reproduction.table import build_table, results_table
from cifar_kit.reproduction.audit import collect_records
from cifar_kit.reproduction.template import result_table
from cifar_kit.run.files import atomic_write_json, write_history
from cifar_kit.config import config_from, config_dict


def _run(root:Path, row:str, seed:int, final:float, best:float, amp:str='off', old_names:bool=False, **extra)->Path:
    "A finished run folder that checks out: history.csv reaching `best` (%) one epoch before the last, at `final`; last.pt; run.json"
    r, d = get_recipe(row), root/row/f'seed{seed}'
    d.mkdir(parents=True)
    n = r.epochs
    top1 = [50 + (100 - best - 50) * (e + 1) / (n - 1) for e in range(n - 1)] + [100 - final]
    write_history([{'epoch': e + 1, 'test_top1': t, 'seconds': 10.0} for e, t in enumerate(top1)], d/'history.csv')
    torch.save({'epoch': n, 'model': {}}, d/'last.pt')
    names = ('final_test_err', 'best_test_err_seed_style', 'seed_err') if old_names else ('final_test_err_pct', 'best_test_err_pct', 'seed_err_pct')
    rec = {'status': 'done', 'recipe': row, 'seed': seed, 'epochs': n, 'epochs_planned': n, 'params': r.expected_params,
           names[0]: final, names[1]: best, names[2]: r.seed_err, 'wall_time_s': 3600.0, 'device': 'NVIDIA H100 80GB HBM3',
           'config': config_dict(config_from(row, seed=seed, amp=amp))} | extra
    atomic_write_json(rec, d/'run.json')
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path/'runs'
    _run(root, 'resnet164-c10', 0, final=6.50, best=6.00, precision='fp32')   # the seed's README: 6.11
    _run(root, 'resnet164-c10', 1, final=6.70, best=6.20, precision='fp32')
    _run(root, 'wrn28_10-c10', 0, final=4.00, best=3.50, amp='bf16', precision='bf16')   # the fast setting: 3.79
    _run(root, 'densenet_bc_100_12-c10', 0, final=5.00, best=4.80, amp='auto', old_names=True)   # an older kit's record: 4.54
    return root


def test_the_table_compares_best_with_best_and_keeps_the_final_epoch_as_headline(runs, tmp_path, capsys):
    df = build_table(runs, tmp_path/'table').set_index('row')
    assert capsys.readouterr().out.strip() == f"wrote RESULTS.md, TRACKS.md, results.csv, cifar.png to {(tmp_path/'table').resolve()}"
    r = df.loc['resnet164-c10']
    assert (r['n'], r['n_best'], r['status'], r['precision']) == (2, 2, 'done ×2', 'fp32')
    assert r['ours_mean'] == pytest.approx(6.60) and r['ours_std'] == pytest.approx(0.1414214, rel=1e-6)   # the headline
    assert r['ours_best_mean'] == pytest.approx(6.10) and r['best_minus_seed'] == pytest.approx(6.10 - 6.11)  # best vs best
    w = df.loc['wrn28_10-c10']
    assert (w['precision'], w['ours_mean']) == ('bf16', pytest.approx(4.00)) and w['best_minus_seed'] == pytest.approx(3.50 - 3.79)
    old = df.loc['densenet_bc_100_12-c10']   # read through the old names; `amp: auto` on a GPU trained in bf16
    assert (old['n'], old['precision']) == (1, 'bf16') and old['best_minus_seed'] == pytest.approx(4.80 - 4.54)
    md = (tmp_path/'table'/'RESULTS.md').read_text()
    assert ("| seed's error (%), best test epoch | ours (%), best test epoch, as the seed reported | ours − seed (points), best vs best "
            "| ours (%): final epoch, mean ± std (n) | precision |") in md
    assert '| ResNet-110 | `resnet164-c10` | 1.70 | 6.11 | 6.10 | -0.01 | 6.60 ± 0.14 (n=2) | fp32 | 164 | 2.00 | done ×2 |' in md, md
    assert '| 3.79 | 3.50 | -0.29 | 4.00 (n=1) | bf16 | 200 | 1.00 | done ×1 |' in md, md
    assert '| 4.54 | 4.80 | +0.26 | 5.00 (n=1) | bf16 | 300 |' in md, md
    assert '+0.49' not in md   # the final-epoch error is never set against the seed's best epoch


def test_the_table_writes_only_into_the_folder_it_is_given(runs, tmp_path, monkeypatch):
    import cifar_kit.reproduction.template as T, cifar_kit.reproduction.table as R
    before = {p: p.read_bytes() for p in runs.rglob('*') if p.is_file()}
    build_table(runs, tmp_path/'given', verbose=False)
    assert sorted(p.name for p in (tmp_path/'given').iterdir()) == ['RESULTS.md', 'TRACKS.md', 'cifar.png', 'results.csv']
    assert {p: p.read_bytes() for p in runs.rglob('*') if p.is_file()} == before
    for m in (T, R): monkeypatch.setattr(m, 'repro_root', lambda: tmp_path/'reproductions')   # the default: reproductions/
    build_table(runs, verbose=False)
    assert (tmp_path/'reproductions'/'RESULTS.md').exists()


def test_a_typed_best_number_is_unverified(runs, tmp_path):
    d = runs/'resnet164-c10'/'seed1'
    rec = json.loads((d/'run.json').read_text()); rec['best_test_err_pct'] = 5.0; (d/'run.json').write_text(json.dumps(rec))
    r = results_table(runs).set_index('row').loc['resnet164-c10']
    assert (r['n'], r['status'], r['ours_best_mean']) == (1, 'done ×1, unverified ×1', pytest.approx(6.00))
    assert "best_test_err_pct 5.0, history.csv's best epoch gives 6.2" in r['unverified']


def test_the_cli_table_says_where_it_wrote(runs, tmp_path, capsys):
    from cifar_kit.cli import main
    assert main(['table', '--runs-dir', str(runs), '--out-dir', str(tmp_path/'t')]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path/'t'/'RESULTS.md'}" in out and out.count('wrote ') == 1


def test_one_runs_result_table_is_best_vs_best():
    md = result_table({'status': 'done', 'epochs': 164, 'epochs_planned': 164, 'final_test_err_pct': 6.5, 'best_test_err_pct': 6.0,
                       'seed_err_pct': 6.11, 'precision': 'fp32', 'params': 1_704_154, 'wall_time_s': 60, 'device': 'x'})
    assert '| ours: final epoch (the headline) | 6.50 |' in md and '| ours: best test epoch, as the seed reported | 6.00 |' in md
    assert 'ours − seed = -0.11 points (best test epoch vs best test epoch)' in md and 'in fp32' in md
