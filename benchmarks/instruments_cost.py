#!/usr/bin/env python
"""What each `train --instruments` callback costs, as a fraction of a training epoch (resnet20 on digits, on the CPU).

Five learners share one model, optimiser and data: one with the run's own step callbacks (`MetricsCB`, `NaNGuardCB`)
and one more for each instrument with that instrument added, built as `train()` builds it (`instrument_callbacks`,
measuring every epoch on a probe batch of `--instrument-n` test images). A round runs one epoch of each (training
pass, test pass, then `after_epoch`, where the instrument measures), the order rotating every round so a change in
the machine's load hits every variant alike. Per round and instrument:

    epoch_ratio   = epoch with the instrument / epoch without it (the paired epoch of the same round)
    measure_share = the instrument's own measurement (timed inside that epoch) / the epoch without it

and the record keeps every round, the medians of both ratios, the epoch's images (an epoch of CIFAR-10 has 35 times
more, so there the share is about 35 times smaller) and the machine's load before and after. Speed is asserted
nowhere: this script only measures and records.

    python benchmarks/instruments_cost.py                          # 3 rounds, a few minutes on 2 cores
    python benchmarks/instruments_cost.py --rounds 5 --out /tmp/instruments.json
"""
from __future__ import annotations
import argparse, dataclasses, datetime, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path
import cifar_kit  # noqa: F401  first: the face registers the instruments (and makes torchvision importable)
import torch
from cifar_kit.core import seed_everything
from cifar_kit.config import config_from, INSTRUMENTS
from cifar_kit.learner import Learner, MetricsCB
from cifar_kit.callbacks import NaNGuardCB
from cifar_kit.train import setup, partial_ce, instrument_callbacks
from cifar_kit.run.files import device_name, git_commit   # what run records say of the machine and the code

ROOT = Path(__file__).resolve().parent.parent


class Timed:
    "Wrap an instrument's `record` to add the seconds of each measurement to `spent`"
    def __init__(self, cb):
        self.cb, self.spent, record = cb, [], cb.record
        def timed(*a, **kw):
            t0 = time.perf_counter(); r = record(*a, **kw); self.spent.append(time.perf_counter() - t0); return r
        cb.record = timed


def learners(c, out:Path)->tuple[dict, dict, dict]:
    "A learner per variant ('none' and each instrument) on one shared model, optimiser and data; the timers; setup's"
    seed_everything(c.seed)
    s = setup(c)
    loaders = s['loaders']
    learns, timers = {}, {}
    for v in ('none', *INSTRUMENTS):
        extra = [] if v == 'none' else instrument_callbacks(dataclasses.replace(c, instruments=v), out)[:1]
        if extra: timers[v] = Timed(extra[0])
        learns[v] = Learner(s['model'], loaders.train, {'test': loaders.test}, partial_ce(c.label_smoothing), s['opt'],
                            None, [MetricsCB(loaders.num_classes), NaNGuardCB(), *extra])
    return learns, timers, s


def epoch(learn:Learner)->float:
    "Seconds of one epoch as `fit` runs it (training pass, test pass, after_epoch: where an instrument measures)"
    t0 = time.perf_counter(); learn._one_epoch(); return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=3, help='interleaved rounds (default 3)')
    ap.add_argument('--instrument-n', type=int, default=256, help='the probe batch (default 256, as train)')
    ap.add_argument('--out', help='output JSON (default benchmarks/results/instruments-cpu-<date>.json)')
    a = ap.parse_args(argv)
    c = config_from('resnet20-digits', device='cpu', progress='off', instrument_n=a.instrument_n)
    load0, t_start = list(os.getloadavg()), time.perf_counter()
    learns, timers, s = learners(c, Path(tempfile.mkdtemp(prefix='cifar_kit_instruments_cost_')))   # the CSVs: scratch
    for v, learn in learns.items():   # warm-up: the probe batch, the measurement before training, one epoch each
        learn.epoch, learn.n_epochs = 0, 10**6
        learn('before_fit'); epoch(learn)
        print(f'warm-up {v}: done', flush=True)
    for t in timers.values(): t.spent.clear()
    seconds, names = {v: [] for v in learns}, list(learns)
    for r in range(a.rounds):
        for v in names[r % len(names):] + names[:r % len(names)]: seconds[v].append(epoch(learns[v]))
        print(f"round {r + 1}/{a.rounds}: " + ', '.join(f'{v} {seconds[v][-1]:.1f}s' for v in names), flush=True)
    epoch_ratio = {v: [w / n for w, n in zip(seconds[v], seconds['none'])] for v in INSTRUMENTS}
    share = {v: [m / n for m, n in zip(timers[v].spent, seconds['none'])] for v in INSTRUMENTS}
    rec = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
           'command': 'python benchmarks/instruments_cost.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
           'git_commit': git_commit()['commit'],
           'machine': {'cpu': device_name('cpu'), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                       'platform': platform.platform(), 'python': platform.python_version(), 'torch': torch.__version__,
                       'loadavg_start': load0, 'loadavg_end': list(os.getloadavg()),
                       'env': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY')}},
           'setup': {'arch': c.arch, 'dataset': c.dataset, 'batch_size': c.batch_size, 'amp': s['amp'],
                     'channels_last': s['channels_last'],
                     'train_images_per_epoch': learns['none'].history[-1]['train_images'],
                     'epoch': 'training pass + test pass + after_epoch, as fit runs it',
                     'instrument_n': c.instrument_n, 'sharpness': {'k': c.sharpness_k, 'iters': c.sharpness_iters},
                     'noise_batch': c.noise_batch},
           'rounds': a.rounds, 'epoch_seconds': seconds,
           'measure_seconds': {v: t.spent for v, t in timers.items()},
           'epoch_ratio': epoch_ratio, 'measure_share': share,
           'median_epoch_ratio': {v: statistics.median(x) for v, x in epoch_ratio.items()},
           'median_measure_share': {v: statistics.median(x) for v, x in share.items()},
           'wall_s': time.perf_counter() - t_start}
    out = Path(a.out) if a.out else ROOT/'benchmarks'/'results'/f"instruments-cpu-{rec['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + '\n')
    for v in INSTRUMENTS:
        print(f"{v:>9}: an epoch with it takes {rec['median_epoch_ratio'][v]:.2f} x one without; "
              f"its measurement {100 * rec['median_measure_share'][v]:.1f}% of an epoch")
    print(f"wrote {out}")
    return rec


if __name__ == '__main__': main()
