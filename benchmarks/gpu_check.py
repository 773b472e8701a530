#!/usr/bin/env python
"""One prepared command for the whole GPU path: correctness on CUDA, speed against the seed-style loop, one record.

    python benchmarks/gpu_check.py           # a CUDA GPU: the full check (about 6-7 minutes), record in results/<gpu>-<date>.json
    python benchmarks/gpu_check.py --dry     # no GPU needed: the same checks on the CPU at tiny sizes (tests/test_gpu_check.py)

Without CUDA the command always runs the dry mode. Every check fails soft: its error is recorded and the next one runs.
A check skipped without being asked to be (`--skip NAME`, or left out by `--only`) fails the run: the optional budget
(`--budget`, CPU seconds of this process, not wall time) records what it cannot pay for as skipped, with the reason, and
the command exits 1. Speed targets are judged only at sizes where they mean something (`bench.JUDGE_MIN`). The checks:

- sync_free: the fast training step a user runs for speed (DeviceLoader + CropFlip, bf16 autocast, channels_last, fused
  SGD, MetricsCB, NaNGuardCB) queues work without waiting for the device: on CUDA under
  `torch.cuda.set_sync_debug_mode('error')`, on the CPU by counting device-to-host reads and tensors built from Python
  data with `DispatchCounter`; sync_free_fp32: the same on the faithful fp32 path;
- compile_step: `compile='step'` (`WholeStepCB`) compiles the whole fast step (crop and flip, loss, backward, SGD
  update, metric sums, divergence flag) into one graph over two epochs with partial batches, with no break and nothing
  in it that reads back;
- bf16_vs_fp32: the losses of the first steps under bf16 autocast and in fp32 agree within a stated bound;
- families: one short `train()` run (training batches, test evaluation, checkpoint) of each seed family;
- switches: the speed switches one at a time on resnet20 (fp16 + GradScaler, amp off, channels_last off, the
  per-image DataLoader feeder);
- resume: a run interrupted in its second epoch and resumed ends with bit-identical weights to an uninterrupted one
  (deterministic mode);
- ddp: `train()` in a one-process process group (nccl on CUDA, gloo on the CPU), the model wrapped in DDP;
- compile: `torch.compile` in modes default and reduce-overhead through `train()`, over full epochs with a partial last
  batch and a resumption in the same process: the graphs compiled (at most 2, none added by the resumption); the
  checkpoint holds the plain module;
- speed: kit (fp32) and kit_fast (bf16 + channels_last) vs the seed-style loop, interleaved, per family (img/s,
  TFLOP/s, s/epoch, paired ratios), the data path; on CUDA then the fast path under `torch.compile` for resnet110
  (reduce-overhead) and wrn28_10 (default);
- fast: the fast track's recipe airbench94-c10 through `train()` on the 50,000 fake images, its training time beside
  airbench94's own trainer (when installed) in the same run, as a ratio (the goal: at most 1.1x); dry: the path only;
- entry: `torchrun --nproc_per_node 1 -m cifar_kit train` (CUDA only).
- fixed_cost: the per-epoch fixed costs of WRN-28-10 (resnet20 dry): the checkpoint's snapshot into CPU memory (what
  the training thread pays), its full write with fsync (what a synchronous save paid) and one curves redraw, against
  the time of an epoch of training steps; the share of an epoch before (synchronous save, curves every epoch) and now.
"""
from __future__ import annotations
import argparse, contextlib, csv, dataclasses, datetime, gc, json, math, os, platform, shutil, socket, subprocess, sys, tempfile, time, traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]        # the checkout's cifar_kit, and bench.py beside this file
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')   # before CUDA starts: the deterministic resume check needs it

import torch
import cifar_kit
from cifar_kit.core import seed_everything, num_params
from cifar_kit.data.readers import write_fake_cifar
from cifar_kit.learner import Learner, MetricsCB, Callback, DispatchCounter
from cifar_kit.data import policies
from cifar_kit.callbacks import NaNGuardCB, MixedPrecisionCB
from cifar_kit.run.files import load_checkpoint_file, unwrap_model
from cifar_kit.config import config_from
from cifar_kit.train import setup, train, partial_ce, option_callbacks
import bench

# the nine rows of the seed's table; the dry mode trains the smallest member of each family
FAMILIES = ['resnet110', 'preresnet110', 'wrn28_10', 'resnext29_8x64d', 'resnext29_16x64d', 'densenet_bc_100_12',
            'densenet_bc_190_40', 'vgg19_bn', 'alexnet']
DRY_FAMILIES = ['resnet20', 'preresnet20', 'wrn16_2', 'resnext29_8x64d', 'densenet_bc_100_12', 'vgg19_bn', 'alexnet']
BF16_BOUND = (0.02, 0.10)   # |loss_bf16 - loss_fp32| / loss_fp32: at the first step (same weights, same batch: only bf16's
                            # 8-bit mantissa differs), and at every one of the first steps (the weights drift apart)
COMPILE_SPEED = {'resnet110': 'reduce-overhead', 'wrn28_10': 'default'}   # the two targets: a thin deep net and a wide one

def profile(dry:bool)->dict:
    "Sizes of one run of the check"
    if dry: return dict(n_per_file=16, families=DRY_FAMILIES, limit=1, batch_size=4, eval_bs=16, steps=4, bf16_steps=3,   # steps < 16: no guard check
                        speed=['resnet20'], speed_batches=1, rounds=1, data_images=32, data_bs=16, data_workers=(0,),
                        speed_n_per_file=80, small_n_per_file=None, budget=None)   # no budget: these sizes fix the work; the speed section's batches of 128 need a larger set
    return dict(n_per_file=10_000, families=FAMILIES, limit=4, batch_size=None, eval_bs=None, steps=40, bf16_steps=10,
                speed=FAMILIES, speed_batches=20, rounds=3, data_images=12_800, data_bs=128, data_workers=(4, 8),
                speed_n_per_file=None, small_n_per_file=1024, budget=400)   # budget: CPU s; small: the switch, resume, DDP and compile runs

# ----------------------------------------------------------------------------------------------------------
# running checks: each fails soft and stays inside the budget

PASSING = ('ok', 'ok (known sync)', 'skipped (asked)')   # a check skipped without being asked to be is a failure

class Checks:
    """Run named checks in order; record status, CPU and wall seconds and figures. The budget is CPU seconds of this
    process (`time.process_time`): a loaded machine stretches the wall clock, not the work. A check the remaining budget
    cannot pay for is recorded as skipped, which fails the run; only `skip` (the names asked to be skipped) pass."""
    def __init__(self, budget_s:float|None, skip=(), log=print):
        self.t0, self.c0, self.budget, self.skip, self.log, self.results = time.perf_counter(), time.process_time(), budget_s, set(skip), log, {}
    def used(self)->float: return time.process_time() - self.c0
    def left(self)->float: return math.inf if self.budget is None else self.budget - self.used()
    def run(self, name:str, fn, *args, cost:float=0, **kw)->dict:
        if name in self.skip: r = {'status': 'skipped (asked)', 'why': 'named by --skip or left out by --only'}
        elif self.left() < cost:
            r = {'status': 'skipped', 'why': f'CPU-time budget: {self.left():.0f} s left of {self.budget:.0f}, about {cost:.0f} s needed '
                                             f'(a skip not asked for fails the run: raise --budget or name it in --skip)'}
        else:
            self.log(f'-- {name}'); t, c = time.perf_counter(), time.process_time()
            try:
                out = fn(*args, **kw) or {}
                r = {'status': 'ok' if out.pop('ok', True) else 'failed', **out}
            except Exception as e:
                r = {'status': 'error', 'error': f'{type(e).__name__}: {e}'[:2000], 'traceback': traceback.format_exc()[-3000:]}
            r['seconds'], r['cpu_seconds'] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
            free_memory()
        self.results[name] = r
        self.log(f"   {name}: {r['status']}" + (f" ({r.get('error') or r.get('why') or r.get('problem', '')})" if r['status'] != 'ok' else '')
                 + (f" in {r['seconds']:.1f} s" if 'seconds' in r else ''))
        return r

def passed(rec:dict)->bool:
    "Whether every check of a record passed: ok, a known sync, or skipped because it was asked to be"
    return all(r['status'] in PASSING for r in rec['checks'].values())

def free_memory():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()

def cfg(arch:str, root:Path, dev:torch.device, p:dict, run_dir:Path|None=None, **kw):
    "A short run's config: one epoch of `limit` batches on the fake data set"
    over = dict(epochs=1, limit_batches=p['limit'], progress='off', device=str(dev), data_dir=str(root), seed=0,
                run_dir=str(run_dir) if run_dir else None)
    if p['batch_size']: over['batch_size'] = p['batch_size']
    if p['eval_bs']: over['eval_batch_size'] = p['eval_bs']
    return config_from(arch=arch, dataset='cifar10', **(over | kw))

def with_compile_mode(c, mode:str):
    "`c` with a compile mode, which `setup` reads as `getattr(c, 'compile_mode', 'default')`"
    object.__setattr__(c, 'compile_mode', mode)   # the config is frozen; this field is not declared yet
    return c

def history_of(run_dir:Path)->list[dict]:
    from cifar_kit.run.files import read_history   # the file's `_pct` columns read back under the kit's names
    return read_history(run_dir/'history.csv')

# ----------------------------------------------------------------------------------------------------------
# correctness

def step_learner(c):
    "The default training path of `train()` without its per-epoch I/O callbacks, ready for single steps"
    seed_everything(c.seed)
    s = setup(c)
    cbs = [MetricsCB(s['loaders'].num_classes), NaNGuardCB()]   # its check every 20 steps reads a copy that has landed
    if s['amp']: cbs.append(MixedPrecisionCB(s['amp'], s['device'].type))
    cbs += option_callbacks(c, s['loaders'].num_classes)          # the modern options' callbacks, as train() adds them
    learn = Learner(s['model'], s['loaders'].train, {}, partial_ce(c.label_smoothing), s['opt'], None, cbs)
    if s['amp'] == 'fp16': learn.scaler = torch.amp.GradScaler(s['device'].type)
    learn.epoch, learn.n_epochs = 0, 1
    learn('before_fit'); learn('before_epoch'); learn('before_train')
    learn.training = True; learn.model.train()
    it = iter(learn.train_dl)
    def step(i:int):
        learn.iter, (learn.xb, learn.yb) = i, next(it)
        with torch.enable_grad(): learn._one_batch()
        learn('after_batch')
    return learn, s, step

MODERN = dict(aa='trivialaugment', reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1, nesterov=True, opt_no_wd_1d=True,
              model_ema=True, model_ema_decay=0.999, clip_grad=1.0)   # every modern training option at once

def check_sync_free(root, dev, p, amp:str|None=None, options:dict|None=None)->dict:
    "No device-to-host read and no tensor from Python data inside `steps` training steps (after 3 warm-up steps)"
    c = cfg('resnet20', root, dev, p, limit_batches=0, **({'amp': amp} if amp else {}), **({'channels_last': 'on'} if amp == 'bf16' else {}),
            **(options or {}))   # bf16 + channels_last: the path a user runs for speed; 'off': the faithful fp32 one
    if dev.type == 'cpu': policies.GROUP_ON_CPU = False   # count the accelerator's path of the per-image policies
    try: return _sync_free(c, dev, p, options)
    finally: policies.GROUP_ON_CPU = True

def _sync_free(c, dev, p, options)->dict:
    learn, s, step = step_learner(c)
    for i in range(3): step(i)
    out = {'arch': 'resnet20', 'amp': s['amp'], 'channels_last': s['channels_last'], 'steps': p['steps'], 'options': options or {},
           'guard': 'NaNGuardCB checks at step 20 inside the window (on one GPU from a copy queued at its previous check)'}
    with DispatchCounter() as dc:
        for i in range(3, 4): step(i)
    out['ops_per_step'] = dc.total; out['reads_per_step_counted'] = dc.reads; out['from_python_per_step'] = dc.from_python
    out['data_dependent_per_step'] = dc.data_dependent
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode('error')
        try:
            for i in range(4, 4 + p['steps']): step(i)
        except RuntimeError as e:
            out.update(ok=False, problem=f'a step synchronised: {e}'.splitlines()[0][:300], where=traceback.format_exc()[-1500:])
            return out
        finally: torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(dev)
        out['method'] = "torch.cuda.set_sync_debug_mode('error') around the steps"
        out['ok'] = True
    else:
        with DispatchCounter() as dc:
            for i in range(4, 4 + p['steps']): step(i)
        out['method'] = 'DispatchCounter: _local_scalar_dense (reads), lift_fresh (tensors from Python data), masks and nonzero (data-dependent sizes)'
        out |= {'reads': dc.reads, 'from_python': dc.from_python, 'data_dependent': dc.data_dependent,
                'ok': dc.reads == 0 and dc.from_python == 0 and dc.data_dependent == 0}
    learn('after_train')
    out['train_loss_read_once'] = learn.cbs[0].row.get('train_loss')
    return out

def check_bf16(root, dev, p)->dict:
    "Losses of the first steps from the same weights and batches, bf16 autocast against fp32"
    losses = {}
    for amp in ('bf16', 'off'):
        learn, s, step = step_learner(cfg('resnet20', root, dev, p, limit_batches=0, amp=amp))
        ls = []
        for i in range(p['bf16_steps']): step(i); ls.append(learn.loss.detach().float())
        losses[amp] = [float(x) for x in ls]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses['bf16'], losses['off'])]
    return {'arch': 'resnet20', 'losses_bf16': losses['bf16'], 'losses_fp32': losses['off'], 'rel_diff': rel,
            'bound': f'abs(bf16 - fp32) <= {BF16_BOUND[0]:.0%} of fp32 at step 1, <= {BF16_BOUND[1]:.0%} at each of the first {p["bf16_steps"]}',
            'max_rel_diff': max(rel), 'ok': rel[0] <= BF16_BOUND[0] and max(rel) <= BF16_BOUND[1] and all(map(math.isfinite, losses['bf16']))}

def short_run(c)->dict:
    "Train config `c` with `train()`; the run's record, last history row and checks"
    rec = train(c).record   # train() returns the Run
    row = history_of(Path(c.run_dir))[-1]
    ok = rec['status'] == 'done' and all(math.isfinite(row[k]) for k in ('train_loss', 'test_loss'))
    ckpt = load_checkpoint_file(Path(c.run_dir)/'last.pt')
    return {'run_status': rec['status'], 'train_loss': row['train_loss'], 'test_top1': row['test_top1'], 'params': rec['params'],
            'train_images_per_s': rec['images_per_s'], 'seconds': rec['wall_time_s'], 'checkpoint_keys': len(ckpt['model']), 'ok': ok}

def check_families(root, dev, p, work:Path, checks:Checks)->dict:
    out, ok = {}, True
    for a in p['families']:
        if checks.left() < 15:   # a family left out by the budget fails the check, like any skip not asked for
            out[a] = {'status': 'skipped', 'why': f'CPU-time budget: {checks.left():.0f} s left'}; ok = False; continue
        try: out[a] = short_run(cfg(a, root, dev, p, work/f'fam-{a}'))
        except Exception as e: out[a] = {'status': 'error', 'error': f'{type(e).__name__}: {e}'[:1000]}
        ok &= out[a].get('ok', False)
        free_memory()
    return {'runs': out, 'ok': ok}

def check_switches(root, dev, p, work:Path)->dict:
    "Each speed switch on its own, on resnet20"
    sw = {'amp_off': dict(amp='off'), 'channels_last_off': dict(channels_last='off'), 'feeder_torch': dict(feeder='torch')}
    if dev.type == 'cuda': sw = {'amp_fp16': dict(amp='fp16')} | sw
    out = {}
    for k, kw in sw.items():
        try: out[k] = short_run(cfg('resnet20', root, dev, p, work/f'sw-{k}', **kw))
        except Exception as e: out[k] = {'status': 'error', 'error': f'{type(e).__name__}: {e}'[:1000]}
    return {'runs': out, 'ok': all(r.get('ok') for r in out.values())}

class StopAt(Callback):
    "Interrupt a run at (epoch, step), as a kill would (KeyboardInterrupt: nothing is saved on the way out)"
    order = 100
    def __init__(self, epoch:int, step:int): self.epoch, self.step = epoch, step
    def after_batch(self):
        if self.learn.training and (self.learn.epoch, self.learn.iter) == (self.epoch, self.step): raise KeyboardInterrupt

def check_resume(root, dev, p, work:Path)->dict:
    "Deterministic mode: interrupted in epoch 2 and resumed == straight through, bit for bit"
    kw = dict(epochs=2, deterministic=True, limit_batches=max(2, p['limit']))
    a = cfg('resnet20', root, dev, p, work/'resume-straight', **kw)
    b = cfg('resnet20', root, dev, p, work/'resume-killed', **kw)
    try:
        train(a)
        try: train(b, cbs=[StopAt(1, 1)])
        except KeyboardInterrupt: pass
        else: return {'ok': False, 'problem': 'the interruption did not happen'}
        train(b)   # the same command again: resumes from the epoch-1 checkpoint
    finally: seed_everything(0)   # back to the default kernels for the checks after this one, whatever happened
    wa, wb = (load_checkpoint_file(Path(x.run_dir)/'last.pt')['model'] for x in (a, b))
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    return {'tensors': len(wa), 'differing': diff[:10], 'ok': not diff and set(wa) == set(wb)}

def check_ddp(root, dev, p, work:Path)->dict:
    "train() in a one-process group, with the DDP wrapper, rank-0 broadcasts and all-reduces on the real backend"
    import torch.distributed as dist
    backend = 'nccl' if dev.type == 'cuda' else 'gloo'
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    if backend == 'nccl': torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        c = cfg('resnet20', root, dev, p, work/'ddp', batch_size=2 * (p['batch_size'] or 128), device='cuda' if dev.type == 'cuda' else 'cpu')
        # world_size=2 with one process: setup() wraps the model in DDP and shards the data as for rank 0 of 2;
        # every collective then runs on `backend` in this single process
        rec = train(c, rank=0, world_size=2).record
        row = history_of(Path(c.run_dir))[-1]
        return {'backend': backend, 'run_status': rec['status'], 'train_loss': row['train_loss'],
                'ok': rec['status'] == 'done' and math.isfinite(row['train_loss'])}
    finally: dist.destroy_process_group()

@contextlib.contextmanager
def cheap_compile(dry:bool):
    "In the dry mode torch.compile traces with dynamo but skips inductor (minutes of C++ builds on a small CPU)"
    if not dry: yield; return
    orig = torch.compile
    torch.compile = lambda model, mode=None, **kw: orig(model, backend='eager')
    try: yield
    finally: torch.compile = orig

def check_compile(root, dev, p, work:Path, mode:str, dry:bool)->dict:
    "train() with torch.compile in `mode` over full epochs ending in a partial batch, then resumed in this process: few graphs, plain checkpoint"
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear()   # this run's graphs only
    bs = 7 if dry else 100                    # 80 or 5,120 training images: a partial last batch (3 or 20) either way
    c = with_compile_mode(cfg('resnet20', root, dev, p, work/f'compile-{mode}', compile=True, limit_batches=0, batch_size=bs), mode)
    with cheap_compile(dry): r = short_run(c)
    graphs = counters['stats'].get('unique_graphs', 0)
    with cheap_compile(dry): short_run(dataclasses.replace(c, epochs=2))   # the resumption of the same run, in this process
    resumed = counters['stats'].get('unique_graphs', 0) - graphs
    sd = load_checkpoint_file(Path(c.run_dir)/'last.pt')['model']
    prefixed = [k for k in sd if k.startswith(('_orig_mod.', 'module.'))]
    fresh = cifar_kit.create_model('resnet20', num_classes=10)
    fresh.load_state_dict(sd)   # strict: raises if the keys are not the plain module's
    r |= {'mode': mode, 'backend': 'eager (dry mode)' if dry else 'inductor', 'prefixed_keys': prefixed[:5], 'batch_size': bs,
          'unique_graphs': graphs, 'graphs_added_by_resume': resumed, 'ok': r['ok'] and not prefixed and graphs <= 2 and resumed == 0}
    return r

class _SyncDebug(Callback):
    "On CUDA, every training step after the first under `set_sync_debug_mode('error')`; the pass's end reads as usual"
    order = 100
    def after_batch(self):
        if self.learn.training and self.learn.iter == 0: torch.cuda.set_sync_debug_mode('error')   # after the epoch's start
class _SyncDebugOff(Callback):
    order = -100   # before MetricsCB and the guard read their one number of the pass
    def after_train(self): torch.cuda.set_sync_debug_mode(0)
    def cleanup_fit(self): torch.cuda.set_sync_debug_mode(0)

SYNC_OPS = DispatchCounter.READS + DispatchCounter.DATA_DEPENDENT   # aten ops that make a GPU's host wait

def _sync_op(node)->str|None:
    "The name of an aten graph node's op if it makes the host wait: a read, or an output sized by the values (a mask)"
    name = getattr(getattr(node.target, 'overloadpacket', None), '__name__', None) if node.op == 'call_function' else None
    masks = [a for a in node.all_input_nodes if getattr(a.meta.get('val'), 'dtype', None) == torch.bool]
    if name in SYNC_OPS or (name in ('index', 'index_put', 'index_put_') and masks): return name

def check_compile_step(root, dev, p, dry:bool)->dict:
    """compile='step' (`WholeStepCB`) on the fast path (bf16, channels_last): two epochs of the real DeviceLoader,
    each ending in a partial batch, compile one graph with no graph break, and nothing in it reads back"""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    from cifar_kit.learner import WholeStepCB
    aten = []   # the dry mode's graphs at the aten level: forward, backward and update in one (traced autograd)
    def keep(gm, example_inputs): aten.append(gm); return make_boxed_func(gm.forward)
    bs = 7 if dry else 100   # 80 or 50,000 training images: a partial last batch (3 or 50)
    c = cfg('resnet20', root, dev, p, limit_batches=0, batch_size=bs, amp='bf16', channels_last='on')
    seed_everything(c.seed); torch._dynamo.reset(); counters.clear()
    s = setup(c)
    cbs = [MetricsCB(s['loaders'].num_classes), NaNGuardCB(), MixedPrecisionCB('bf16', dev.type),
           WholeStepCB(**({'backend': aot_autograd(fw_compiler=keep)} if dry else {})),   # dry: no inductor C++ builds
           *([_SyncDebug(), _SyncDebugOff()] if dev.type == 'cuda' else [])]
    learn = Learner(s['model'], s['loaders'].train, {}, partial_ce(c.label_smoothing), s['opt'], None, cbs)
    try: learn.fit(2)
    except RuntimeError as e:
        if 'synchroniz' not in str(e): raise
        return {'ok': False, 'problem': f'a step synchronised: {e}'.splitlines()[0][:300], 'where': traceback.format_exc()[-1500:]}
    graphs, breaks = counters['stats'].get('unique_graphs', 0), sum(counters['graph_break'].values())
    syncs = sorted({_sync_op(n) for g in aten for n in g.graph.nodes} - {None})
    h = learn.history
    return {'arch': 'resnet20', 'amp': s['amp'], 'channels_last': s['channels_last'], 'batch_size': bs, 'epochs': 2,
            'steps_per_epoch': len(s['loaders'].train), 'unique_graphs': graphs, 'graph_breaks': breaks,
            'in_graph': 'crop and flip, forward and loss (bf16 autocast), backward, SGD update, loss/top-k sums, divergence flag',
            'method': ("set_sync_debug_mode('error') around every step after an epoch's first" if dev.type == 'cuda' else
                       f'aten graph scanned for {", ".join(SYNC_OPS)}: {len(aten)} graph(s), '
                       f'{sum(len(g.graph.nodes) for g in aten)} nodes'),
            'sync_ops_in_graph': syncs, 'train_loss': [r['train_loss'] for r in h],
            'ok': graphs == 1 and breaks == 0 and not syncs and len(h) == 2 and all(map(math.isfinite, (r['train_loss'] for r in h)))}

def check_entry(root, dev, p, work:Path)->dict:
    "The command line under torchrun, one process"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', '-m', 'cifar_kit', 'train',
           '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', str(root), '--epochs', '1', '--out-dir', str(work/'entry'),
           '--progress', 'off']
    env = os.environ | {'PYTHONPATH': os.pathsep.join([str(HERE.parent), os.environ.get('PYTHONPATH', '')])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    return {'command': ' '.join(cmd[1:]), 'returncode': r.returncode, 'tail': (r.stdout + r.stderr)[-1500:], 'ok': r.returncode == 0}

# ----------------------------------------------------------------------------------------------------------
# speed

def check_speed(root, dev, p, checks:Checks, archs=None, compile_modes:dict|None=None)->dict:
    "Kit vs seed-style loop per net, interleaved (paired per-round ratios); with `compile_modes`, also the kit compiled"
    out, seed_workers = [], 0 if dev.type == 'cpu' else 4
    for a in archs or p['speed']:
        mode = (compile_modes or {}).get(a)
        if checks.left() < (120 if mode else 12):
            out.append({'arch': a, 'status': 'skipped', 'why': f'CPU-time budget: {checks.left():.0f} s left'}); continue
        try:
            r = bench.bench_train(a, dev, batches=p['speed_batches'], rounds=p['rounds'], compile=bool(mode), compile_mode=mode,
                                  seed_workers=seed_workers, root=root, log=lambda *x: None)
            r['status'] = 'ok'
        except Exception as e:
            r = {'arch': a, 'status': 'error', 'error': f'{type(e).__name__}: {e}'[:1000], 'compile_mode': mode}
        out.append(r); free_memory()
    return {'train': out, 'ok': all(r['status'] == 'ok' for r in out)}   # a net left out by the budget fails it too

def check_data_path(root, dev, p)->dict:
    return bench.bench_data(dev, p['data_images'], p['rounds'], p['data_workers'], p['data_bs'], root=root, log=lambda *x: None)

def check_airbench(root, dev, work:Path)->dict:
    "airbench94's trainer on the same fake data, timed in this run (needs the airbench package)"
    try: import airbench
    except ImportError: return {'status_note': 'airbench is not installed (carry its wheel: benchmarks/wheels.sh)', 'ok': True}
    from cifar_kit.data.registry import get_dataset
    d = work/'airbench'/'cifar10'; d.mkdir(parents=True, exist_ok=True)
    for split, train_ in (('train', True), ('test', False)):
        ds = get_dataset('cifar10', root, train=train_)
        torch.save({'images': ds.images.permute(0, 2, 3, 1).contiguous(), 'labels': ds.labels, 'classes': list(ds.classes)}, d/f'{split}.pt')
    cwd = os.getcwd(); os.chdir(d.parent)   # airbench reads ./cifar10/{train,test}.pt
    try:
        loader = airbench.CifarLoader('cifar10', train=True, batch_size=1024, aug=dict(flip=True, translate=2), altflip=True)
        airbench.warmup94(loader, verbose=False)
        torch.cuda.synchronize(); t = time.perf_counter()
        airbench.train94(loader, verbose=False)   # returns the trained net; accuracy means nothing on random labels
        torch.cuda.synchronize(); dt = time.perf_counter() - t
    finally: os.chdir(cwd)
    return {'train94_seconds': dt, 'epochs': 'airbench94 defaults (~10 epochs of its own net, batch 1024)',
            'note': 'the time of a purpose-built fast CIFAR-10 trainer on this GPU, the speed peer of the kit'}

FAST_GOAL = 1.1   # the fast recipe's training time at most this many times airbench94's, on the same GPU and data

def _fast_run(root, dev, p, run_dir:Path, **kw)->dict:
    "One `train()` run of recipe airbench94-c10 on the fake data: its wall time, its training time, its record"
    c = config_from('airbench94-c10', data_dir=str(root), device=str(dev), progress='off', seed=0, run_dir=str(run_dir), **kw)
    if dev.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter(); run = train(c)
    if dev.type == 'cuda': torch.cuda.synchronize()
    hist = history_of(run_dir)
    return dict(call_s=time.perf_counter() - t, train_s=sum(r.get('train_seconds', 0) for r in hist), epochs=len(hist),
                run_status=run.record['status'], amp=c.amp)

def check_fast(root, dev, p, work:Path)->dict:
    """The fast track's recipe (airbench94-c10) through `train()` on 50,000 fake CIFAR-10 images, timed beside airbench's
    own trainer in the same run (the second of two kit runs: the first warms up cuDNN's autotuner); dry: a short run"""
    if dev.type != 'cuda':   # the path only: one epoch of two small batches, whitening from the 32 images there are
        r = _fast_run(root, dev, p, work/'fast', epochs=1, limit_batches=2, batch_size=p['batch_size'] or 4, whiten_init=16)
        return r | {'ok': r['run_status'] == 'done' and r['epochs'] == 1}
    warm = _fast_run(root, dev, p, work/'fast-warm')
    kit = _fast_run(root, dev, p, work/'fast')
    ab = check_airbench(root, dev, work)
    out = dict(kit=kit, kit_warmup_call_s=round(warm['call_s'], 2), airbench=ab, goal=f'kit training time <= {FAST_GOAL}x airbench94')
    if 'train94_seconds' in ab:   # airbench's time covers its whitening init, training and final evaluation
        ratio = kit['train_s'] / ab['train94_seconds']
        out |= dict(ratio_train=round(ratio, 3), ratio_call=round(kit['call_s'] / ab['train94_seconds'], 3),
                    met=ratio <= FAST_GOAL)
    return out | {'ok': kit['run_status'] == 'done'}

def check_fixed_cost(dev, p, work:Path, share:float=0.01)->dict:
    "What the end of an epoch costs besides training: checkpoint snapshot and write, curves, as shares of an epoch"
    from types import SimpleNamespace
    from cifar_kit.callbacks import CurvesCB
    from cifar_kit.run.files import checkpoint_state, detached_copy, save_keeping_previous
    dry = dev.type == 'cpu'
    arch, bs, steps = ('resnet20', 32, 3) if dry else ('wrn28_10', 128, 20)
    model = cifar_kit.create_model(arch, num_classes=10).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(bs, 3, 32, 32, device=dev).to(memory_format=torch.channels_last), torch.randint(0, 10, (bs,), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not dry)
    def step():
        with amp: loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    step(); step(); sync(); t = time.perf_counter()
    for _ in range(steps): step()
    sync(); epoch_s = (time.perf_counter() - t) / steps * math.ceil(50_000 / bs)   # an epoch of 50,000 images, eager bf16
    history = [{'epoch': e + 1, 'lr': 0.1, 'train_loss': 1 / (e + 1), 'train_top1': e / 3, 'test_loss': 1.1 / (e + 1), 'test_top1': e / 3.2}
               for e in range(200)]
    learn = SimpleNamespace(model=model, opt=opt, sched=None, scaler=None, epoch=200, history=history, plan_changes=[], is_main=True)
    timed = lambda f: (sync(), (t := time.perf_counter()), f(), sync(), time.perf_counter() - t)[-1]
    snap_s = timed(lambda: detached_copy(checkpoint_state(learn, {})))
    state = detached_copy(checkpoint_state(learn, {})); d = work/'fixed-cost'; d.mkdir(parents=True, exist_ok=True)
    save_keeping_previous(state, d/'last.pt')
    write_s = timed(lambda: save_keeping_previous(state, d/'last.pt'))           # write + fsync + rotate, like every epoch after the first
    sync_save_s = timed(lambda: save_keeping_previous(checkpoint_state(learn, {}), d/'last.pt'))   # the synchronous save from the device
    cb = CurvesCB(d/'curves.png'); cb.learn = learn; cb.before_fit(); cb.draw()   # the first draw imports matplotlib
    curves_s = timed(cb.draw)
    waits_s = max(0.0, write_s - epoch_s)       # a write longer than an epoch makes the next save wait for the rest
    before = (sync_save_s + curves_s) / epoch_s
    now = (snap_s + waits_s + min(curves_s, share * epoch_s + curves_s / 200)) / epoch_s   # curves: within `share`, plus the last draw
    return {'arch': arch, 'epoch_s_estimate': round(epoch_s, 3), 'checkpoint_mb': round((d/'last.pt').stat().st_size / 2**20, 1),
            'snapshot_s': round(snap_s, 4), 'background_write_s': round(write_s, 3), 'synchronous_save_s': round(sync_save_s, 3),
            'curves_s': round(curves_s, 3), 'share_before': round(before, 4), 'share_now': round(now, 4),
            'met': now < 0.02, 'target': 'fixed costs < 2% of an epoch', 'ok': True}   # a measurement, not a verdict on this machine's speed

# ----------------------------------------------------------------------------------------------------------
# the record

def driver_version()->str:
    try: return subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except Exception: return ''

def speed_rows(res:dict)->list[str]:
    rows = ['| model | variant | img/s | TFLOP/s | s/epoch | ÷ seed-style (paired median; of medians) |', '| --- | --- | ---: | ---: | ---: | ---: |']
    for tr in [t for k in ('speed', 'speed_compile') for t in res.get(k, {}).get('train', [])]:
        if tr.get('status') != 'ok':
            rows.append(f"| {tr['arch']} | {tr.get('status')} | {tr.get('error') or tr.get('why', '')} | | | |"); continue
        for k, v in tr['variants'].items():
            rr = tr['ratios'].get(f'{k}/seed')
            rows.append(f"| {tr['arch']} | {k}{' (' + tr['settings']['kit_compile']['mode'] + ')' if k == 'kit_compile' else ''} | "
                        f"{v['img_per_s_stats']['median']:,.0f} | {v['tflops']['median']:.2f} | {v['s_per_epoch']['median']:.2f} | "
                        f"{'1' if rr is None else '%.2f× (%.2f×)' % (rr['paired']['median'], rr['of_medians'])} |")
    return rows

def summary(rec:dict)->str:
    res = rec['checks']
    lines = [f"## cifar_kit GPU check: {rec['device'].get('name')} ({'dry mode, CPU' if rec['dry'] else 'full'}), {rec['date']}", '',
             f"torch {rec['versions']['torch']}, CUDA {rec['versions']['cuda'] or '-'}, driver {rec['device'].get('driver') or '-'}; "
             f"{rec['seconds']:.0f} s; load average {' '.join(f'{x:.1f}' for x in rec['device']['loadavg_start'])} -> "
             f"{' '.join(f'{x:.1f}' for x in rec['device'].get('loadavg_end', []))}", '',
             f"result: {'passed' if rec.get('passed') else 'FAILED'} ({sum(r['status'] in PASSING for r in res.values())} of "
             f"{len(res)} checks passed, skips asked for included)", '',
             '| check | status | seconds | note |', '| --- | --- | ---: | --- |']
    for k, r in res.items():
        note = r.get('error') or r.get('why') or r.get('problem') or r.get('status_note') or r.get('note') or ''
        if k.startswith('sync_free') and not note: note = f"{r.get('method', '')}; {r.get('ops_per_step')} ops per step"
        if k == 'bf16_vs_fp32' and not note: note = f"{r['bound']}; max {r['max_rel_diff']:.2%}"
        if k == 'compile_step' and not note: note = f"{r.get('unique_graphs')} graph, {r.get('graph_breaks')} breaks; {r.get('method')}"
        if k.startswith('compile') and not note: note = f"{r.get('backend')}; {r.get('unique_graphs')} graphs; checkpoint keys plain"
        if k == 'airbench' and not note and 'train94_seconds' in r: note = f"airbench94 {r['train94_seconds']:.1f} s"
        if k == 'fast' and not note and 'ratio_train' in r:
            note = (f"airbench94-c10 trains in {r['kit']['train_s']:.1f} s, {r['ratio_train']:.2f}x airbench94's "
                    f"{r['airbench']['train94_seconds']:.1f} s ({'met' if r['met'] else 'MISSED'}: {r['goal']})")
        elif k == 'fast' and not note and 'kit' not in r: note = f"{r.get('epochs')} epoch ({r.get('run_status')}): the path only"
        if k == 'resume' and not note: note = f"{r.get('tensors')} tensors, {len(r.get('differing', []))} differ"
        if k == 'ddp' and not note: note = f"backend {r.get('backend')}"
        if k in ('families', 'switches') and 'runs' in r:
            bad = [a for a, x in r.get('runs', {}).items() if not x.get('ok')]
            note = f"{len(r.get('runs', {})) - len(bad)}/{len(r.get('runs', {}))} ran" + (f"; not: {', '.join(bad)}" if bad else '')
        lines.append(f"| {k} | {r['status']} | {r.get('seconds', '')} | {str(note)[:160].replace('|', '/')} |")
    if any(res.get(k, {}).get('train') for k in ('speed', 'speed_compile')): lines += ['', *speed_rows(res)]
    if res.get('data_path', {}).get('status') == 'ok':
        h = res['data_path']['headline']; lines += ['', f"data path: kit DeviceLoader {h['ratio']:.1f}× the seed-style {h['vs']} (paired per-round median)"]
        if 'modern_cost' in res['data_path']:
            m = res['data_path']['modern_cost']; lines.append(f"modern data path ({m['policies']}): {m['ratio']:.1f}× slower than crop and flip alone")
    if rec.get('targets'): lines += ['', *[f"- {bench.target_word(t)}: {t['target']}: {t['measured']:.2f}" + (f" ({t['why']})" if t.get('why') else '')
                                           for t in rec['targets']]]
    return '\n'.join(lines) + '\n'

def plan_of(dev, p:dict, work:Path, checks:Checks)->list[tuple]:
    "The checks in order: (name, function, arguments, CPU seconds it needs from the budget)"
    root, cuda, dry = work/'data', dev.type == 'cuda', dev.type != 'cuda'
    speed_root = work/'speed-data' if p['speed_n_per_file'] else root
    small = work/'small-data' if p['small_n_per_file'] else root   # one eval batch
    plan = [('sync_free', check_sync_free, (root, dev, p, 'bf16'), 15),               # the fast path: bf16 + channels_last
            ('sync_free_fp32', check_sync_free, (root, dev, p, 'off'), 15),           # the faithful path: fp32
            ('sync_free_modern', check_sync_free, (root, dev, p, 'bf16', MODERN), 15),
            ('compile_step', check_compile_step, (root, dev, p, dry), 30 if dry else 90),
            *([('sync_free_fp16', check_sync_free, (root, dev, p, 'fp16'), 10)] if cuda else []),
            ('bf16_vs_fp32', check_bf16, (root, dev, p), 10),
            ('families', check_families, (root, dev, p, work, checks), 20),
            ('switches', check_switches, (small, dev, p, work), 15),
            ('resume', check_resume, (small, dev, p, work), 15),
            ('ddp', check_ddp, (small, dev, p, work), 10),
            ('speed', check_speed, (speed_root, dev, p, checks), 30),
            ('data_path', check_data_path, (root, dev, p), 10),
            ('compile_default', check_compile, (small, dev, p, work, 'default', dry), 45),
            ('compile_reduce_overhead', check_compile, (small, dev, p, work, 'reduce-overhead', dry), 45),
            ('fast', check_fast, (root, dev, p, work), 40)]   # on CUDA it times airbench's trainer too
    if cuda: plan += [('speed_compile', check_speed, (root, dev, p, checks, list(COMPILE_SPEED), COMPILE_SPEED), 120),
                      ('entry', check_entry, (small, dev, p, work), 40),
                      ('fixed_cost', check_fixed_cost, (dev, p, work), 20)]
    return plan

def main(argv=None)->dict:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--dry', action='store_true', help='the CPU dry mode at tiny sizes (automatic without CUDA)')
    ap.add_argument('--budget', type=float, default=None,
                    help='CPU seconds of this process for all checks (default 400 on a GPU, none dry); a check it skips fails the run')
    ap.add_argument('--only', nargs='+', default=None, help='run only these checks (names as in the record); the others count as asked to skip')
    ap.add_argument('--skip', nargs='+', default=[], help='skip these checks (recorded as skipped on request; they do not fail the run)')
    ap.add_argument('--out', default=str(HERE/'results'), help='folder for the record (JSON and markdown)')
    ap.add_argument('--no-save', action='store_true', help='print the summary only')
    a = ap.parse_args(argv)
    dry = a.dry or not torch.cuda.is_available()
    p = profile(dry)
    dev = torch.device('cpu') if dry else torch.device('cuda', torch.cuda.current_device())
    work = Path(tempfile.mkdtemp(prefix='cifar_kit_gpucheck_'))
    checks = Checks(a.budget if a.budget is not None else p['budget'])
    plan = plan_of(dev, p, work, checks)
    names = [n for n, *_ in plan]
    if unknown := sorted((set(a.skip) | set(a.only or ())) - set(names)):
        shutil.rmtree(work, ignore_errors=True)
        ap.error(f"no check named {', '.join(unknown)} on this device; the checks are: {', '.join(names)}")
    checks.skip = set(a.skip) | (set(names) - set(a.only) if a.only is not None else set())
    info = bench.device_info(dev) | ({'driver': driver_version()} if not dry else {})
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{info['name']} | torch {torch.__version__} | {'dry mode (CPU, tiny sizes)' if dry else 'full check'} | "
          f"budget {'none' if checks.budget is None else f'{checks.budget:.0f} CPU s'}")
    try:
        write_fake_cifar(work/'data', n=p['n_per_file'])   # 5 x n training images in CIFAR-10's own format
        if p['speed_n_per_file']: write_fake_cifar(work/'speed-data', n=p['speed_n_per_file'])
        if p['small_n_per_file']: write_fake_cifar(work/'small-data', n=p['small_n_per_file'])
        for name, fn, args, cost in plan: checks.run(name, fn, *args, cost=cost)
        if 'sync_free_fp16' in checks.results and checks.results['sync_free_fp16']['status'] == 'failed':
            checks.results['sync_free_fp16']['note'] = 'expected: GradScaler.step reads its inf check every step'
            checks.results['sync_free_fp16']['status'] = 'ok (known sync)'
    finally: shutil.rmtree(work, ignore_errors=True)
    info['loadavg_end'] = list(os.getloadavg())
    rec = {'date': now.strftime('%Y-%m-%dT%H:%M:%SZ'), 'dry': dry, 'command': 'python benchmarks/gpu_check.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
           'device': info, 'versions': bench.versions(), 'profile': {k: v for k, v in p.items()},
           'env': {k: os.environ.get(k) for k in ('CUBLAS_WORKSPACE_CONFIG', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY')},
           'seconds': round(time.perf_counter() - checks.t0, 1), 'cpu_seconds': round(checks.used(), 1), 'budget_cpu_s': checks.budget,
           'passed': None, 'checks': checks.results}
    trained = {t['arch']: t for k in ('speed', 'speed_compile') for t in checks.results.get(k, {}).get('train', [])
               if t.get('status') == 'ok'}   # a compiled run of a net replaces its eager one: it holds kit, kit_fast, kit_compile and seed
    if trained:
        rec['targets'] = bench.check_targets({'device': info, 'train': list(trained.values())}
                                             | ({'data': checks.results['data_path']} if checks.results.get('data_path', {}).get('status') == 'ok' else {}))
    rec['passed'] = passed(rec)
    md = summary(rec)
    print('\n' + md)
    if not a.no_save:
        out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
        path = bench.out_path(out, bench.device_kind(info) + ('-dry' if dry else ''), now.strftime('%Y-%m-%d'), 'gpucheck')
        path.write_text(json.dumps(rec, indent=1, default=str)); path.with_suffix('.md').write_text(md)
        print(f'record: {path}')
    return rec

if __name__ == '__main__':
    sys.exit(0 if passed(main()) else 1)
