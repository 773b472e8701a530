"What the end of an epoch and a compiled step must not waste: checkpoints written while training goes on, few compiled graphs"
import sys, threading
from functools import partial
from pathlib import Path
import torch
import cifar_kit.callbacks
from cifar_kit.data.readers import write_fake_cifar
from cifar_kit.learner import Callback
from cifar_kit.run.files import load_checkpoint_file
from cifar_kit.config import config_from
from cifar_kit.train import train

ROOT = Path(__file__).resolve().parents[1]
# 80 training images in batches of 6: 13 full batches and a partial one of 2
TINY = dict(arch='resnet20', dataset='cifar10', batch_size=6, eval_batch_size=16, progress='off', deterministic=True, device='cpu')


class BatchSizes(Callback):
    "Record the size of every training batch"
    def __init__(self): self.sizes = set()
    def before_batch(self):
        if self.learn.training: self.sizes.add(len(self.learn.yb))


def test_few_graphs_with_a_partial_batch_and_none_on_resume(tmp_path, monkeypatch):
    "Compiled training: one graph for the full and the partial batches, none for evaluation, none added by resuming in the same process"
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, 'compile', partial(torch.compile, backend='eager'))   # dynamo's graphs without inductor's build
    torch._dynamo.reset(); counters.clear()
    data = write_fake_cifar(tmp_path/'data', n=16).parent
    c = config_from(**TINY, data_dir=str(data), epochs=1, compile=True, run_dir=str(tmp_path/'run'))
    sizes = BatchSizes()
    train(c, cbs=[sizes])
    assert sizes.sizes == {6, 2}                      # the last partial batch is trained on
    graphs = counters['stats']['unique_graphs']
    assert graphs <= 2, graphs
    run = train(config_from(**TINY, data_dir=str(data), epochs=2, compile=True, run_dir=str(tmp_path/'run')))
    assert [r['epoch'] for r in run.history] == [1, 2]
    assert counters['stats']['unique_graphs'] == graphs   # the resumed fit recompiles nothing


def test_checkpoint_is_written_while_the_next_epoch_trains(tmp_path, monkeypatch):
    "Epoch 2's checkpoint is still being written when epoch 3 trains; the end of the fit waits, and last.pt holds the final weights"
    data = write_fake_cifar(tmp_path/'data', n=16).parent
    cfg = lambda d: config_from(**TINY, data_dir=str(data), epochs=3, limit_batches=3, run_dir=str(tmp_path/d))
    train(cfg('ref'))                                    # the same run, nothing held up
    started, go = threading.Event(), threading.Event()
    real, overlapped = cifar_kit.callbacks.save_keeping_previous, []
    def blocking_save(state, path):
        if state['epoch'] == 2: started.set(); overlapped.append(go.wait(timeout=120))   # released only from inside epoch 3
        return real(state, path)
    monkeypatch.setattr(cifar_kit.callbacks, 'save_keeping_previous', blocking_save)
    class Release(Callback):
        def before_batch(self):
            if self.learn.training and self.learn.epoch == 2 and self.learn.iter == 1: assert started.wait(60); go.set()
    train(cfg('run'), cbs=[Release()])
    assert overlapped == [True]
    ck, ref = load_checkpoint_file(tmp_path/'run'/'last.pt'), load_checkpoint_file(tmp_path/'ref'/'last.pt')
    assert ck['epoch'] == 3 and load_checkpoint_file(tmp_path/'run'/'last.pt.prev')['epoch'] == 2
    assert all(torch.equal(ck['model'][k], v) for k, v in ref['model'].items())   # the snapshot is the epoch's weights, bit for bit
    assert torch.equal(ck['rng']['torch'], ref['rng']['torch'])


def test_fixed_cost_check_runs_on_the_cpu(tmp_path):
    "The GPU check's fixed-cost measurement runs here too (resnet20), so it cannot rot between GPU runs"
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import gpu_check
    r = gpu_check.check_fixed_cost(torch.device('cpu'), {}, tmp_path)
    assert r['arch'] == 'resnet20' and r['checkpoint_mb'] > 1
    assert all(r[k] > 0 for k in ('epoch_s_estimate', 'snapshot_s', 'background_write_s', 'synchronous_save_s', 'curves_s'))
    # the shares are measured ratios rounded to 4 decimals: on a slow or busy CPU (an estimated epoch of thousands of
    # seconds against a redraw of a fraction of one) they round to 0.0, so only their presence and sign are checked
    assert all(isinstance(r[k], float) and r[k] >= 0 for k in ('share_now', 'share_before')) and r['met'] in (True, False)
