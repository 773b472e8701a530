"The GPU check's dry mode runs on the CPU (so the command cannot rot between GPU runs); the training step reads nothing back"
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn
from cifar_kit.learner import Learner, MetricsCB, DispatchCounter
from cifar_kit.callbacks import NaNGuardCB, DivergedError
from cifar_kit.data.augment import random_crop_flip

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {'sync_free', 'sync_free_fp32', 'sync_free_modern', 'compile_step', 'bf16_vs_fp32', 'families', 'switches', 'resume', 'ddp', 'compile_default', 'compile_reduce_overhead',
          'speed', 'data_path', 'fast'}

NO_BUDGET = '1e9'   # seconds: the check's time budget never skips a check here, however slow or busy the machine
HANG_GUARD = 3600   # seconds: only stops a hung run, it is not a speed requirement (the dry mode takes minutes on a small CPU)

def gpu_check(*args:str, timeout:int=HANG_GUARD)->subprocess.CompletedProcess:
    "Run `benchmarks/gpu_check.py --dry *args` in a fresh process"
    env = os.environ | {'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, str(ROOT/'benchmarks'/'gpu_check.py'), '--dry', *args],
                          capture_output=True, text=True, timeout=timeout, env=env)

def test_dry_mode(tmp_path):
    "Every check of `benchmarks/gpu_check.py --dry` passes and the record is written (no time budget: nothing is skipped)"
    r = gpu_check('--budget', NO_BUDGET, '--skip', 'compile_step', '--out', str(tmp_path))   # compile_step: its own test below
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rec = json.loads(next(tmp_path.glob('*.json')).read_text())
    assert rec['dry'] and set(rec['checks']) == CHECKS
    assert rec['checks'].pop('compile_step')['status'] == 'skipped (asked)' and rec['passed']
    bad = {k: v for k, v in rec['checks'].items() if v['status'] != 'ok'}
    assert not bad, bad
    c = rec['checks']
    assert c['sync_free']['reads'] == 0 and c['sync_free']['from_python'] == 0
    assert (c['sync_free']['amp'], c['sync_free']['channels_last'], c['sync_free_fp32']['amp']) == ('bf16', True, None)   # fast and faithful
    assert (c['sync_free_fp32']['reads'], c['sync_free_fp32']['from_python'], c['sync_free_fp32']['data_dependent']) == (0, 0, 0)
    m = c['sync_free_modern']   # every modern option on, the policies on the accelerator's masked path
    assert (m['reads'], m['from_python'], m['data_dependent']) == (0, 0, 0) and m['options']['aa'] == 'trivialaugment'
    assert c['resume']['differing'] == [] and c['compile_default']['prefixed_keys'] == []
    assert len(c['families']['runs']) == 7 and all(x['ok'] for x in c['families']['runs'].values())
    assert (c['fast']['run_status'], c['fast']['epochs']) == ('done', 1)   # the fast recipe's path through train()
    assert (tmp_path/next(tmp_path.glob('*.json')).with_suffix('.md').name).read_text().startswith('## cifar_kit GPU check')

@pytest.mark.slow
def test_compile_step_dry(tmp_path):
    "compile='step' on the fast path: one graph over two epochs with partial batches, no break, no read in it (dynamo: ~30 CPU s)"
    r = gpu_check('--only', 'compile_step', '--out', str(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    st = json.loads(next(tmp_path.glob('*.json')).read_text())['checks']['compile_step']
    assert (st['unique_graphs'], st['graph_breaks'], st['sync_ops_in_graph'], st['amp'], st['channels_last']) == (1, 0, [], 'bf16', True)
    assert st['steps_per_epoch'] == 12 and len(st['train_loss']) == 2   # 80 images in batches of 7: 11 full and one of 3

def test_budget_skip_fails_the_run(tmp_path):
    "A check the budget skips fails the run (exit 1, the reason recorded); a check skipped on request does not"
    rest = sorted(CHECKS - {'bf16_vs_fp32'})
    r = gpu_check('--budget', '0', '--skip', *rest, '--out', str(tmp_path/'a'))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads(next((tmp_path/'a').glob('*.json')).read_text())
    c = rec['checks']
    assert c['bf16_vs_fp32']['status'] == 'skipped' and 'budget' in c['bf16_vs_fp32']['why'] and rec['passed'] is False
    assert {c[k]['status'] for k in rest} == {'skipped (asked)'}
    sys.path.insert(0, str(ROOT/'benchmarks'))
    from gpu_check import passed
    c['bf16_vs_fp32'] = {'status': 'skipped (asked)'}
    assert passed(rec)   # what the exit status reads: the same record with that skip asked for passes
    r = gpu_check('--skip', 'no_such_check', '--no-save')   # a wrong name stops before any work
    assert r.returncode == 2 and 'no check named no_such_check' in r.stderr

def test_targets_judged_only_at_their_size():
    "A target measured on a few batches is 'not judged at this size', never met or missed"
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import bench
    data = lambda n, rounds: {'device': {'type': 'cpu'}, 'data': {'headline': {'vs': 'seed_dataloader_w0', 'ratio': 3.0},
                                                                  'settings': {'n_images': n, 'rounds': rounds}}}
    [t] = bench.check_targets(data(32, 1))
    assert (t['met'], t['judged'], bench.target_word(t)) == (None, False, 'not judged at this size') and '32 images' in t['why']
    [t] = bench.check_targets(data(12_800, 3))
    assert (t['met'], bench.target_word(t)) == (False, 'MISSED')
    tr = lambda b: {'device': {'type': 'cpu'}, 'train': [{'arch': 'resnet20', 'settings': {'batches_per_round': b, 'rounds': 7},
                   'ratios': {'kit/seed': {'paired': {'median': 1.5}, 'of_medians': 1.4}, 'kit_fast/seed': {'paired': {'median': 0.5}, 'of_medians': 0.5}}}]}
    assert [t['met'] for t in bench.check_targets(tr(2))] == [None]
    assert [t['met'] for t in bench.check_targets(tr(8))] == [True]   # on the CPU the faithful fp32 kit against the fp32 seed loop

def _learner(cbs):
    learn = Learner(nn.Linear(8, 10), [], cbs=cbs)
    learn.epoch, learn.n_epochs, learn.training = 0, 1, True
    learn('before_epoch'); learn('before_train')
    return learn

def test_guard_builds_no_tensor_per_step():
    "The divergence guard keeps its step counter on the device: no tensor from Python data, no read between checks"
    learn = _learner([NaNGuardCB(check_every=20)])
    for i in range(3):
        learn.iter, learn.loss = i, torch.tensor(1.0)
        with DispatchCounter() as c: learn('after_loss')
        if i: assert (c.from_python, c.reads) == (0, 0), c.ops

def test_guard_step_after_a_skipped_batch():
    "A batch skipped before its loss (iter jumps) still reports the right step"
    learn = _learner([NaNGuardCB(check_every=100)])
    for i, v in [(0, 1.0), (1, 1.0), (4, 1.0), (5, float('nan')), (6, 1.0)]:
        learn.iter, learn.loss = i, torch.tensor(v)
        learn('after_loss')
    with pytest.raises(DivergedError, match='step 6'): learn('after_train')

def test_metrics_and_crop_flip_read_nothing():
    "MetricsCB.after_batch and the batched crop-flip (CPU generator, CPU batch) queue work without reading it back"
    learn = _learner([MetricsCB(10)])
    learn.xb, learn.yb = torch.randn(16, 8), torch.randint(0, 10, (16,))
    for _ in range(2):
        learn.preds = learn.model(learn.xb); learn.loss = nn.functional.cross_entropy(learn.preds, learn.yb)
        with DispatchCounter() as c: learn('after_batch')
    assert (c.reads, c.from_python) == (0, 0) and c.total <= 12, c.ops
    x, g = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0)
    with DispatchCounter() as c: random_crop_flip(x, generator=g)
    assert (c.reads, c.from_python) == (0, 0), c.ops
