#!/usr/bin/env python
"""Side-by-side benchmark: cifar_kit's data path and training step against a seed-style (bearpaw) pipeline.

Two measurements, each interleaved round by round (A, B, B, A, ...: the order flips every round so a drift in
the machine's load hits every variant alike), reported as medians with min/max:

1. data path, images/s: the kit's `DeviceLoader` (uint8 set on the device, batched `CropFlip`, normalise on the
   device) against a seed-style `DataLoader` whose Dataset applies the seed's per-image PIL transforms
   (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), the same augmentation;
2. training, images/s and achieved TFLOP/s (img/s x 3 x forward GFLOP/img / 1000, forward FLOPs counted with
   torch's FlopCounterMode on the model itself) per model: the kit's faithful path `kit` (the real `Learner.fit`
   with `DeviceLoader`, foreach/fused SGD, device-side metrics, fp32 like the seed), its fast path `kit_fast` (the
   same with bf16 autocast + channels_last), a seed-style loop (DataLoader + per-image transforms, fp32, NCHW,
   eager, non-foreach SGD, `.item()` of loss and top-1/top-5 every batch like the seed's AverageMeter), and, with
   --compile, the fast path with `torch.compile` (`kit_compile`).

Results go to benchmarks/results/<device-kind>-<date>.json; `--summarize` prints them as markdown tables.
Speed is never asserted anywhere: this script only prints and records the ratios.

    python benchmarks/bench.py                                 # CPU, resnet20 + resnet110, a few minutes
    python benchmarks/bench.py --device cuda --compile         # GPU: resnet20, resnet110, wrn28_10
    python benchmarks/bench.py --summarize                     # markdown tables of every results/*.json
"""
from __future__ import annotations
import argparse, dataclasses, datetime, json, math, os, platform, re, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
import cifar_kit  # first: its shim makes torchvision importable on any torch build
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from cifar_kit.core import seed_everything, create_model, get_device, num_params
from cifar_kit.data.feeders import DeviceLoader, TorchLoader
from cifar_kit.data.readers import write_fake_cifar
from cifar_kit.data.registry import get_dataset
from cifar_kit.data.augment import CropFlip, CIFAR_MEAN, CIFAR_STD, seed_train_transform
from cifar_kit.loaders import train_batch_tfm
from cifar_kit.config import config_from
from cifar_kit.train import setup, Take, partial_ce
from cifar_kit.learner import Learner, MetricsCB, WholeStepCB
from cifar_kit.callbacks import NaNGuardCB, MixedPrecisionCB
from cifar_kit.run.files import unwrap_model

HERE = Path(__file__).resolve().parent
EPOCH_IMAGES = 50_000  # one CIFAR training epoch, for the s/epoch column
MODERN_AA, MODERN_REPROB = 'trivialaugment', 0.25   # the per-image policies the data-path benchmark prices against crop and flip

# The targets, as ratios measured in one run (and two absolute ones on an H100)
TARGETS = {'cpu': {'data_ratio_min': 10.0, 'train_ratio_min': {'resnet20': 1.0, 'resnet110': 1.0}},
           'cuda': {'train_ratio_min': {'resnet110': 3.0, 'wrn28_10': 3.0},
                    's_per_epoch_max': {'resnet110': 2.0, 'wrn28_10': 5.0}}}

# ----------------------------------------------------------------------------------------------------------
# timing helpers

def sync(device:torch.device):
    "Wait for the device (a no-op on the CPU, where every op has finished when it returns)"
    if device.type == 'cuda': torch.cuda.synchronize(device)

def stats(xs:list[float])->dict:
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs)}

def interleave(fns:dict, rounds:int, warmup:int=1, device:torch.device|None=None, log=print)->dict:
    """Call every `fns[name]()` `warmup` times untimed, then `rounds` timed times, interleaved, the order reversed
    every other round (ABBA). A function returns the images it processed (and is timed whole, with a device
    sync), or `(images, seconds)` when it times itself (to leave out a loader's start-up)."""
    def call(f):
        t0 = time.perf_counter(); r = f()
        if device is not None: sync(device)
        return r if isinstance(r, tuple) else (r, time.perf_counter() - t0)
    for w in range(warmup):
        for k, f in fns.items():
            t0 = time.perf_counter(); call(f)
            log(f'    warm-up {w+1}/{warmup} {k}: {time.perf_counter() - t0:.1f} s')
    out = {k: {'images': [], 'seconds': []} for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            n, dt = call(fns[k])
            out[k]['images'].append(n); out[k]['seconds'].append(dt)
        log('    round %d/%d: ' % (r + 1, rounds) + ', '.join(
            f"{k} {out[k]['images'][-1] / out[k]['seconds'][-1]:,.0f} img/s" for k in fns))
    for v in out.values():
        v['img_per_s'] = [n / s for n, s in zip(v['images'], v['seconds'])]
        v['img_per_s_stats'] = stats(v['img_per_s'])
    return out

def timed_batches(loader, n:int, device:torch.device, step=None)->tuple[int, float]:
    """A fresh pass over `loader`: the first batch is drawn and dropped untimed (worker start-up, as once per epoch
    in the seed), then `n` batches are timed, each moved to `device` and given to `step(x, y)` if any"""
    it = iter(loader)
    next(it)
    sync(device)
    t0, seen = time.perf_counter(), 0
    for _ in range(n):
        x, y = next(it)
        x, y = x.to(device), y.to(device, non_blocking=True)
        if step is not None: step(x, y)
        seen += len(y)
    sync(device)
    dt = time.perf_counter() - t0
    del it  # shuts down this pass's workers, after the clock stopped
    return seen, dt

def ratio(res:dict, a:str, b:str)->dict:
    "Speed of `a` over `b`: the ratio of the medians, and the median/min/max of the per-round (paired) ratios"
    ra, rb = res[a]['img_per_s'], res[b]['img_per_s']
    paired = [x / y for x, y in zip(ra, rb)]
    return {'of_medians': statistics.median(ra) / statistics.median(rb), 'paired': stats(paired), 'per_round': paired}

# ----------------------------------------------------------------------------------------------------------
# the seed-style pipeline (the baseline: bearpaw's cifar.py, written out here, not kit code)

class SeedCIFAR(Dataset):
    "Like torchvision's CIFAR10 as the seed used it: HWC uint8 numpy images, a PIL image per item, then `transform`"
    def __init__(self, images_nchw:torch.Tensor, labels:torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # N x 32 x 32 x 3, as torchvision stores CIFAR
        self.targets, self.transform = labels.tolist(), transform
    def __len__(self): return len(self.data)
    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]

def seed_transform(mean=CIFAR_MEAN, std=CIFAR_STD):
    "The seed's training transform (bearpaw cifar.py), on PIL images"
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

def seed_loader(images, labels, batch_size:int, workers:int, device:torch.device)->DataLoader:
    "The seed's DataLoader: shuffle, per-image transforms, `workers` processes (the seed: 4), no pinned memory"
    return DataLoader(SeedCIFAR(images, labels, seed_transform()), batch_size, shuffle=True, num_workers=workers, pin_memory=False)

def seed_accuracy(output, target, topk=(1,)):
    "bearpaw utils/eval.py `accuracy`: precision@k in percent, as tensors"
    maxk, n = max(topk), target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / n) for k in topk]

class AverageMeter:
    "bearpaw utils/misc.py AverageMeter"
    def __init__(self): self.sum, self.count, self.avg = 0., 0, 0.
    def update(self, val, n=1): self.sum += val * n; self.count += n; self.avg = self.sum / self.count

def seed_train_steps(model, opt, loader, n:int, device:torch.device)->tuple[int, float]:
    "`n` timed steps of the seed's train(): forward, loss, accuracy, `.item()` into the meters, zero_grad, backward, step"
    model.train()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    def step(x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        p1, p5 = seed_accuracy(out.data, y, topk=(1, 5))
        losses.update(loss.item(), x.size(0)); top1.update(p1.item(), x.size(0)); top5.update(p5.item(), x.size(0))
        opt.zero_grad(); loss.backward(); opt.step()
    return timed_batches(loader, n, device, step)

# ----------------------------------------------------------------------------------------------------------
# data set and device description

def fake_cifar_root(n_train:int=50_000, root:str|Path|None=None)->Path:
    "A folder with random CIFAR-10 files in the real format (`n_train` training and n_train/5 test images)"
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix='cifar_kit_bench_'))
    if not (root/'cifar-10-batches-py'/'data_batch_5').exists(): write_fake_cifar(root, n=math.ceil(n_train / 5))
    return root

def cpu_name()->str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def device_info(device:torch.device)->dict:
    d = {'type': device.type, 'cpu': cpu_name(), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
         'platform': platform.platform(), 'loadavg_start': list(os.getloadavg()),
         'env': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'MKL_NUM_THREADS', 'KMP_BLOCKTIME')}}
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        d |= {'name': torch.cuda.get_device_name(device), 'capability': list(torch.cuda.get_device_capability(device)),
              'memory_gib': round(p.total_memory / 2**30, 1), 'sm_count': p.multi_processor_count,
              'cudnn_benchmark': torch.backends.cudnn.benchmark, 'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
              'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}
    else: d['name'] = d['cpu']
    return d

def device_kind(info:dict)->str:
    return 'cpu' if info['type'] == 'cpu' else re.sub(r'[^a-z0-9]+', '-', info['name'].lower()).strip('-')

def versions()->dict:
    return {'cifar_kit': str(cifar_kit.__version__), 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'python': platform.python_version(), 'numpy': np.__version__, 'cuda': torch.version.cuda or '',
            'cudnn': str(torch.backends.cudnn.version() or '')}

# ----------------------------------------------------------------------------------------------------------
# 1. data path

def bench_data(device:str|torch.device='cpu', n_images:int=12_800, rounds:int=5, workers=(0, 2), batch_size:int=128,
               root:str|Path|None=None, v2:bool=True, modern:bool=True, log=print)->dict:
    """Images/s of the kit's DeviceLoader + CropFlip + normalise against seed-style per-image DataLoaders
    (one per entry of `workers`), and the kit's own per-image feeder (`TorchLoader`, transforms.v2) if `v2`.
    With `modern`, also the device path of the modern recipes (`--aa trivialaugment --reprob 0.25` after the crop
    and flip, every image drawing its own operation, magnitude and erased box), and its cost against crop and flip.
    Every variant delivers `n_images` normalised float batches on `device` per round."""
    device = get_device(device)
    seed_everything(0)
    ds = get_dataset('cifar10', fake_cifar_root(root=root), train=True)
    n_batches = max(1, n_images // batch_size)
    cl = device.type == 'cuda'   # the kit's default: channels_last batches on CUDA only
    kit_dl = DeviceLoader(ds.images, ds.labels, batch_size, shuffle=True, device=device, batch_tfm=CropFlip(4),
                          mean=CIFAR_MEAN, std=CIFAR_STD, channels_last=cl, seed=0)
    fns = {'kit_device': lambda: timed_batches(kit_dl, n_batches, device)}
    if modern:   # the same loader as `train()` builds it for the modern options
        modern_dl = DeviceLoader(ds.images, ds.labels, batch_size, shuffle=True, device=device, seed=0, mean=CIFAR_MEAN, std=CIFAR_STD,
                                 channels_last=cl, batch_tfm=train_batch_tfm('cifar10', aa=MODERN_AA, reprob=MODERN_REPROB, mean=CIFAR_MEAN))
        fns['kit_device_modern'] = lambda: timed_batches(modern_dl, n_batches, device)
    for w in workers:
        fns[f'seed_dataloader_w{w}'] = (lambda dl: lambda: timed_batches(dl, n_batches, device))(seed_loader(ds.images, ds.labels, batch_size, w, device))
    if v2:  # the kit's fallback feeder (feeder='torch'): per-image transforms.v2 on tensors, 0 workers
        tl = TorchLoader(ds, batch_size, shuffle=True, device=device, transform=seed_train_transform(CIFAR_MEAN, CIFAR_STD))
        fns['kit_torchloader_v2_w0'] = lambda: timed_batches(tl, n_batches, device)
    log(f'data path on {device}: {n_batches} batches of {batch_size} per variant and round, {rounds} rounds')
    load0 = list(os.getloadavg())
    res = interleave(fns, rounds, warmup=1, device=device, log=log)
    load = {'before': load0, 'after': list(os.getloadavg())}
    seeds = [k for k in res if k.startswith('seed_')]
    out = {'settings': {'n_images': n_batches * batch_size, 'batch_size': batch_size, 'rounds': rounds, 'workers': list(workers),
                        'kit_channels_last': cl, 'augmentation': 'zero-pad 4, random 32x32 crop, flip p=0.5, normalise (seed mean/std)'},
           'variants': res, 'loadavg': load,
           'ratios': {f'kit_device/{k}': ratio(res, 'kit_device', k) for k in res if k != 'kit_device'}}
    best_seed = max(seeds, key=lambda k: res[k]['img_per_s_stats']['median'])
    r = out['ratios'][f'kit_device/{best_seed}']   # the headline: the paired per-round median (a change of load hits both alike)
    out['headline'] = {'vs': best_seed, 'ratio': r['paired']['median'], 'of_medians': r['of_medians'], 'statistic': 'paired per-round median'}
    if modern:
        c = out['ratios']['kit_device/kit_device_modern']
        out['modern_cost'] = {'policies': f'--aa {MODERN_AA} --reprob {MODERN_REPROB}, after crop and flip', 'statistic': 'paired per-round median',
                              'ratio': c['paired']['median'], 'of_medians': c['of_medians'],
                              'meaning': 'crop-and-flip batches per second ÷ modern batches per second, on the same device in the same rounds',
                              f'modern/{best_seed}': ratio(res, 'kit_device_modern', best_seed)['paired']['median']}
    return out

# ----------------------------------------------------------------------------------------------------------
# 2. training

def fwd_gflop(arch:str, model_kwargs:dict|None=None)->tuple[float, str]:
    "Forward GFLOP per 32x32 image (2 x multiply-adds of convs and linears, 10 classes), counted with torch's FlopCounterMode"
    from torch.utils.flop_counter import FlopCounterMode
    m = create_model(arch, num_classes=10, **(model_kwargs or {})).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): m(torch.zeros(1, 3, 32, 32))
    return fc.get_total_flops() / 1e9, 'torch FlopCounterMode'

def kit_learner(c, device_batches:int, compile_mode:str|None=None, compile:bool=False)->tuple[Learner, dict]:
    """The kit's default training path for config `c`, as `train()` builds it (setup, SGD, Learner, MetricsCB,
    NaNGuardCB, MixedPrecisionCB when amp resolves on), with the training feeder limited by `Take`. The per-epoch
    I/O callbacks of `train()` (progress bar, checkpoint, history CSV, curves) are left out, and no scheduler runs."""
    seed_everything(c.seed)
    s = setup(c)
    step = compile and compile_mode == 'step'   # the whole step as one graph (WholeStepCB) instead of the model alone
    if compile and not step: s['model'] = torch.compile(s['model'], **({'mode': compile_mode} if compile_mode else {}))
    cbs = [MetricsCB(s['loaders'].num_classes), NaNGuardCB()]
    if s['amp']: cbs.append(MixedPrecisionCB(s['amp'], s['device'].type))
    if step: cbs.append(WholeStepCB())
    learn = Learner(s['model'], Take(s['loaders'].train, device_batches), {}, partial_ce(c.label_smoothing), s['opt'], None, cbs)
    return learn, s

def kit_round(learn:Learner):
    "One timed round: one (limited) epoch of the real `Learner.fit`; returns the images trained on"
    def f():
        learn.fit(learn.epoch + 1)
        return learn.history[-1]['train_images']
    return f

MIN_BATCHES = 8   # per variant and round: shorter rounds (3 batches, ~2 s) let a step in the machine's load flip a verdict

def default_batches(arch:str, device:torch.device, batch_size:int)->int:
    "Batches per round: about 6 s of work at ~60 GFLOP/s on a small CPU (at least `MIN_BATCHES`), a fixed 60 on a GPU"
    if device.type == 'cuda': return 60
    g = fwd_gflop(arch)[0]
    return max(MIN_BATCHES, min(20, round(6 * 60 / (3 * g * batch_size))))

FAST = dict(amp='bf16', channels_last='on')   # the settings a user turns on for speed (the README's fast path)

def bench_train(arch:str, device:str|torch.device='cpu', batches:int|None=None, rounds:int=5, compile:bool=False,
                compile_mode:str|None=None, seed_workers:int|None=None, root:str|Path|None=None, log=print, fast:bool=True)->dict:
    """Training images/s and TFLOP/s of `arch` (bearpaw recipe settings: batch size, lr, momentum, wd): the kit's
    faithful path (`kit`: fp32, the recipe's defaults), its fast path (`kit_fast`: bf16 autocast + channels_last, if
    `fast`) and, with `compile`, the fast path compiled (`kit_compile`), vs the seed-style loop, interleaved."""
    device = get_device(device)
    root = fake_cifar_root(root=root)
    c = config_from(arch=arch, dataset='cifar10', data_dir=str(root), device=str(device), progress='off', seed=0)
    bs = c.batch_size
    batches = batches or default_batches(arch, device, bs)
    seed_workers = (0 if device.type == 'cpu' else 4) if seed_workers is None else seed_workers
    gflop, gflop_src = fwd_gflop(arch, c.model_kwargs)

    learn, s = kit_learner(c, batches)
    fns = {'kit': kit_round(learn)}
    cf = dataclasses.replace(c, **FAST)
    if fast:
        learn_f, s_f = kit_learner(cf, batches)
        fns['kit_fast'] = kit_round(learn_f)
    if compile:
        learn_c, s_c = kit_learner(cf, batches, compile_mode, compile=True)
        fns['kit_compile'] = kit_round(learn_c)
    # the seed-style loop: same model code and recipe, fp32, NCHW, eager, plain (for-loop) SGD
    seed_everything(c.seed)
    ds = get_dataset('cifar10', root, train=True)
    model = create_model(c.arch, num_classes=10, **c.model_kwargs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.wd, foreach=False)
    loader = seed_loader(ds.images, ds.labels, bs, seed_workers, device)
    fns['seed'] = lambda: seed_train_steps(model, opt, loader, batches, device)

    log(f"training {arch} on {device}: batch {bs}, {batches} batches per variant and round, {rounds} rounds"
        f"{' (first kit_compile warm-up compiles)' if compile else ''}")
    t0, load0 = time.perf_counter(), list(os.getloadavg())
    res = interleave(fns, rounds, warmup=1, device=device, log=log)
    load = {'before': load0, 'after': list(os.getloadavg())}
    for v in res.values():
        m = v['img_per_s_stats']
        v['tflops'] = {k: x * 3 * gflop / 1000 for k, x in m.items()}
        v['s_per_epoch'] = {k: EPOCH_IMAGES / x for k, x in m.items()}
    ratios = {f'{k}/seed': ratio(res, k, 'seed') for k in res if k != 'seed'}
    if fast: ratios['kit_fast/kit'] = ratio(res, 'kit_fast', 'kit')
    if compile: ratios['kit_compile/kit'] = ratio(res, 'kit_compile', 'kit')
    return {'arch': arch, 'params': num_params(unwrap_model(learn.model)), 'fwd_gflop_per_img': gflop, 'fwd_gflop_source': gflop_src,
            'settings': {'batch_size': bs, 'batches_per_round': batches, 'rounds': rounds, 'lr': c.lr, 'momentum': c.momentum, 'wd': c.wd,
                         'model_kwargs': dict(c.model_kwargs),
                         'kit': {'amp': s['amp'], 'channels_last': s['channels_last'], 'optimizer': 'fused' if device.type == 'cuda' else 'foreach',
                                 'feeder': 'DeviceLoader + CropFlip', 'metrics': 'MetricsCB (sums on the device, read once per epoch) + NaNGuardCB'},
                         'kit_fast': ({'amp': s_f['amp'], 'channels_last': s_f['channels_last']} if fast else None),
                         'kit_compile': ({'mode': compile_mode or 'default', 'amp': s_c['amp'], 'channels_last': s_c['channels_last']}
                                         if compile else None),
                         'seed': {'dtype': 'float32', 'memory_format': 'NCHW', 'optimizer': 'SGD foreach=False', 'workers': seed_workers,
                                  'feeder': 'DataLoader + PIL RandomCrop/Flip/ToTensor/Normalize per image',
                                  'metrics': 'loss, top-1, top-5 .item() every batch'}},
            'wall_s': time.perf_counter() - t0, 'loadavg': load, 'variants': res, 'ratios': ratios}

# ----------------------------------------------------------------------------------------------------------
# targets, output, summary

JUDGE_MIN = {'data_images': 12_800, 'batches': MIN_BATCHES, 'rounds': 3}   # smaller runs measure start-up and noise, not the ratio a target names

def _n(k:int, word:str)->str: return f"{k} {word}{'' if k == 1 else 'es' if word.endswith('ch') else 's'}"

def _unjudged(size:str, need:str)->dict:
    return {'met': None, 'judged': False, 'why': f'{size}; a verdict needs {need}'}

def _verdict(met:bool, size_ok:bool, size:str, need:str)->dict:
    return {'met': met, 'judged': True} if size_ok else _unjudged(size, need)

def target_word(t:dict)->str:
    "met, MISSED, or not judged at this size"
    return 'not judged at this size' if t.get('met') is None else 'met' if t['met'] else 'MISSED'

def check_targets(result:dict)->list[dict]:
    """Each target that applies to this run: what it asks, what was measured, and met or not, judged only at sizes
    where the ratio means something (`JUDGE_MIN`); below them the record says 'not judged at this size'"""
    kind = 'cuda' if result['device']['type'] == 'cuda' else 'cpu'
    t, out = TARGETS[kind], []
    if 'data' in result and 'data_ratio_min' in t:
        r, st = result['data']['headline'], result['data']['settings']
        ok = st['n_images'] >= JUDGE_MIN['data_images'] and st['rounds'] >= JUDGE_MIN['rounds']
        out.append({'target': f"data path >= {t['data_ratio_min']:g}x the per-image DataLoader ({r['vs']}, paired per-round median)",
                    'measured': r['ratio'], **_verdict(r['ratio'] >= t['data_ratio_min'], ok,
                    f"{st['n_images']:,} images per round, {_n(st['rounds'], 'round')}",
                    f"{JUDGE_MIN['data_images']:,} images per round and {JUDGE_MIN['rounds']} rounds")})
    for tr in result.get('train', []):
        a, st = tr['arch'], tr['settings']
        # CPU: the faithful fp32 kit against the fp32 seed loop; CUDA: the fastest path timed (compiled, else bf16)
        v = next(k for k in (('kit_compile', 'kit_fast', 'kit') if kind == 'cuda' else ('kit',)) if f'{k}/seed' in tr['ratios'])
        ok = st['batches_per_round'] >= JUDGE_MIN['batches'] and st['rounds'] >= JUDGE_MIN['rounds']
        size, need = (f"{_n(st['batches_per_round'], 'batch')} per round, {_n(st['rounds'], 'round')}",
                      f"{JUDGE_MIN['batches']} batches per round and {JUDGE_MIN['rounds']} rounds")
        if a in t.get('train_ratio_min', {}):
            r = tr['ratios'][f'{v}/seed']['paired']['median']
            out.append({'target': f"{a}: {v} >= {t['train_ratio_min'][a]:g}x seed-style (paired per-round median)", 'measured': r,
                        **_verdict(r >= t['train_ratio_min'][a], ok, size, need), 'of_medians': tr['ratios'][f'{v}/seed']['of_medians']})
        if a in t.get('s_per_epoch_max', {}):
            e = tr['variants'][v]['s_per_epoch']['median']
            out.append({'target': f"{a}: {v} <= {t['s_per_epoch_max'][a]:g} s/epoch (H100)", 'measured': e,
                        **_verdict(e <= t['s_per_epoch_max'][a], ok, size, need)})
    return out

def out_path(out_dir:Path, kind:str, date:str, tag:str='')->Path:
    p = out_dir/f"{kind}-{date}{('-' + tag) if tag else ''}.json"
    i = 2
    while p.exists(): p = out_dir/f"{kind}-{date}{('-' + tag) if tag else ''}-{i}.json"; i += 1
    return p

def _fmt_r(r:dict)->str:
    p = r['paired']
    return f"paired median {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}); ratio of medians {r['of_medians']:.2f}x"

def print_report(result:dict, log=print):
    if 'data' in result:
        log('\n== data path, images/s (median [min-max]) ==')
        for k, v in result['data']['variants'].items():
            s = v['img_per_s_stats']; log(f"  {k:24s} {s['median']:>10,.0f}  [{s['min']:,.0f}-{s['max']:,.0f}]")
        for k, r in result['data']['ratios'].items(): log(f'  {k}: {_fmt_r(r)}')
        if 'modern_cost' in result['data']:
            m = result['data']['modern_cost']; log(f"  modern data path ({m['policies']}): crop and flip is {m['ratio']:.2f}x faster")
    for tr in result.get('train', []):
        log(f"\n== training {tr['arch']} (batch {tr['settings']['batch_size']}, {tr['fwd_gflop_per_img']} fwd GFLOP/img) ==")
        for k, v in tr['variants'].items():
            s = v['img_per_s_stats']
            log(f"  {k:12s} {s['median']:>9,.1f} img/s [{s['min']:,.1f}-{s['max']:,.1f}]  {v['tflops']['median']:.4f} TFLOP/s  "
                f"{v['s_per_epoch']['median']:,.1f} s/epoch")
        for k, r in tr['ratios'].items(): log(f'  {k}: {_fmt_r(r)}')
    log('\n== targets ==')
    for t in result['targets']: log(f"  [{target_word(t)}] {t['target']}: {t['measured']:.2f}" + (f" ({t['why']})" if t.get('why') else ''))

def summarize(out_dir:str|Path=HERE/'results')->str:
    "Markdown tables of every results JSON in `out_dir` (newest first), for the README"
    parts = []
    for p in sorted(Path(out_dir).glob('*.json'), reverse=True):
        r = json.loads(p.read_text())
        if not {'device', 'versions', 'date', 'command'} <= r.keys(): continue   # another script's record
        d, v = r['device'], r['versions']
        parts.append(f"### {d['name']} ({d['type']}, {d.get('torch_threads')} threads) — {r['date']}\n\n"
                     f"`{p.name}`: torch {v['torch']}, cifar_kit {v['cifar_kit']}, torchvision {v['torchvision']}; "
                     f"command `{r['command']}`; load average at start {', '.join(f'{x:.1f}' for x in d.get('loadavg_start', []))}"
                     f"{', at end ' + ', '.join(f'{x:.1f}' for x in d['loadavg_end']) if d.get('loadavg_end') else ''}.\n")
        if 'data' in r:
            dd = r['data']
            rows = ['| Data path | img/s median | min–max | kit ÷ this (paired median; ratio of medians) |', '| --- | ---: | ---: | ---: |']
            for k, x in dd['variants'].items():
                s, rr = x['img_per_s_stats'], dd['ratios'].get(f'kit_device/{k}')
                rows.append(f"| {k} | {s['median']:,.0f} | {s['min']:,.0f}–{s['max']:,.0f} | "
                            f"{'–' if rr is None else '%.1f× (%.1f×)' % (rr['paired']['median'], rr['of_medians'])} |")
            parts.append(f"Data path ({dd['settings']['n_images']:,} images per variant and round, {dd['settings']['rounds']} rounds):\n\n" + '\n'.join(rows) + '\n')
            if 'modern_cost' in dd:
                m = dd['modern_cost']
                parts.append(f"The modern data path (`kit_device_modern`: {m['policies']}) is {m['ratio']:.1f}× slower than crop and flip alone "
                             f"(paired per-round median; ratio of medians {m['of_medians']:.1f}×).\n")
        if r.get('train'):
            rows = ['| Model | Variant | img/s median | min–max | TFLOP/s | s/epoch (50k) | ÷ seed-style (paired median, min–max; medians) |',
                    '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
            for tr in r['train']:
                for k, x in tr['variants'].items():
                    s, rr = x['img_per_s_stats'], tr['ratios'].get(f'{k}/seed')
                    rs = '1 (baseline)' if k == 'seed' else f"{rr['paired']['median']:.2f}× ({rr['paired']['min']:.2f}–{rr['paired']['max']:.2f}; {rr['of_medians']:.2f}×)"
                    rows.append(f"| {tr['arch']} | {k} | {s['median']:,.1f} | {s['min']:,.1f}–{s['max']:,.1f} | {x['tflops']['median']:.4f} | "
                                f"{x['s_per_epoch']['median']:,.1f} | {rs} |")
            st = r['train'][0]['settings']
            parts.append(f"Training (batch {st['batch_size']}; batches per round and rounds per model in the JSON):\n\n" + '\n'.join(rows) + '\n')
        if r.get('targets'):
            parts.append('Targets:\n\n' + '\n'.join(f"- {'**missed**' if t.get('met') is False else target_word(t)}: {t['target']} — measured {t['measured']:.2f}" + (f" ({t['why']})" if t.get('why') else '')
                                                   for t in r['targets']) + '\n')
    return '\n'.join(parts) if parts else '(no results yet)\n'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
    ap.add_argument('--models', nargs='+', default=None, help='default: resnet20 resnet110 (cpu); resnet20 resnet110 wrn28_10 (cuda)')
    ap.add_argument('--compile', action='store_true', help='also time the fast path with torch.compile (slow to compile on CPU)')
    ap.add_argument('--no-fast', action='store_true', help='leave out kit_fast (bf16 autocast + channels_last); the faithful fp32 kit is always timed')
    ap.add_argument('--compile-mode', default=None, help="torch.compile mode: default (the kit's), 'max-autotune-no-cudagraphs', 'reduce-overhead', ..., "
                                                         "or 'step': the whole training step as one graph (WholeStepCB)")
    ap.add_argument('--batches', type=int, default=None, help='training batches per variant and round (default: ~6 s of CPU work per model, 60 on CUDA)')
    ap.add_argument('--rounds', type=int, default=None, help='timed rounds (default 7 on CPU, 5 on CUDA)')
    ap.add_argument('--data-images', type=int, default=12_800, help='images per variant and round in the data-path benchmark')
    ap.add_argument('--data-workers', type=int, nargs='+', default=None, help='seed-style DataLoader workers to compare (default 0 2 on CPU, 4 8 on CUDA)')
    ap.add_argument('--seed-workers', type=int, default=None, help='DataLoader workers of the seed-style training loop (default 0 on CPU, 4 on CUDA, as the seed)')
    ap.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s own, one per core)')
    ap.add_argument('--omp-wait-policy', default=None, choices=['PASSIVE', 'ACTIVE'],
                    help='re-run this command with OMP_WAIT_POLICY set (it must be set before torch starts OpenMP); '
                         'PASSIVE avoids spinning threads on a shared, oversubscribed CPU (see README)')
    ap.add_argument('--skip-data', action='store_true'); ap.add_argument('--skip-train', action='store_true')
    ap.add_argument('--out', default=str(HERE/'results'), help='folder for the results JSON')
    ap.add_argument('--tag', default='', help='suffix for the results file name')
    ap.add_argument('--no-save', action='store_true')
    ap.add_argument('--summarize', action='store_true', help='print markdown tables of the results in --out and exit')
    a = ap.parse_args(argv)
    if a.summarize: print(summarize(a.out)); return
    if a.omp_wait_policy and os.environ.get('OMP_WAIT_POLICY') != a.omp_wait_policy:
        os.environ['OMP_WAIT_POLICY'] = a.omp_wait_policy
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve())] + list(sys.argv[1:] if argv is None else argv))
    if a.threads: torch.set_num_threads(a.threads)
    device = get_device(a.device)
    seed_everything(0)  # also cudnn.benchmark = True, as both the kit's train() and the seed's cifar.py set it
    cuda = device.type == 'cuda'
    models = a.models or (['resnet20', 'resnet110', 'wrn28_10'] if cuda else ['resnet20', 'resnet110'])
    rounds = a.rounds or (5 if cuda else 7)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {'date': now.strftime('%Y-%m-%dT%H:%M:%SZ'), 'command': 'python benchmarks/bench.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              'device': device_info(device), 'versions': versions()}
    print(f"{result['device']['name']} | torch {torch.__version__} | cifar_kit {cifar_kit.__version__} | threads {torch.get_num_threads()}")
    root = fake_cifar_root()
    t0 = time.perf_counter()
    if not a.skip_data:
        result['data'] = bench_data(device, a.data_images, rounds, a.data_workers or ([4, 8] if cuda else [0, 2]), root=root)
    if not a.skip_train:
        result['train'] = [bench_train(m, device, a.batches, rounds, a.compile, a.compile_mode, a.seed_workers, root, fast=not a.no_fast)
                           for m in models]
    result['wall_s'] = time.perf_counter() - t0
    result['device']['loadavg_end'] = list(os.getloadavg())
    result['targets'] = check_targets(result)
    print_report(result)
    if not a.no_save:
        out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
        p = out_path(out, device_kind(result['device']), now.strftime('%Y-%m-%d'), a.tag)
        p.write_text(json.dumps(result, indent=1)); print(f'\nwrote {p}')
    return result

if __name__ == '__main__': main()
