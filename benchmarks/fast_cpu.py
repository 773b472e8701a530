#!/usr/bin/env python
"""The fast recipe against the seed's on the CPU: the training step side by side, and test accuracy per CPU second.

Two recipes, both on the digits (32×32, 1,437 training and 360 test images: CIFAR cannot be downloaded here):

    fast  recipe `airbench94-c10` (airbench94: whitening init, 64x lr on the norm biases, decoupled Nesterov SGD, the
          triangle schedule, Lookahead, label smoothing 0.2, alternating flips, a ±2 px reflect translation, TTA level
          2; see 29_fast), its data set swapped for the digits and its batch of 1,024 (most of an epoch of digits)
          cut to `--fast-batch`; its lr and wd are per 1,024 images (decoupled), so they carry over
    seed  recipe `resnet20-digits`: the seed's ResNet-20 step (SGD with momentum 0.9, multistep, pad-4 crop), the
          kit's CPU demo of the seed's CIFAR recipes

1. Step time. Each recipe's model, optimiser, schedule, data and callbacks as `train()` builds them (`setup`,
   `option_callbacks`); rounds of `--steps` training steps of each, interleaved A B B A so that a change in the
   machine's load hits both alike. Per round: CPU seconds (`time.process_time`, this process, all its threads) and
   wall seconds per step and per image, and the ratio fast / seed; the record keeps every round and the medians.
2. Accuracy per second. One full run of each recipe (`train()` in a scratch folder, evaluated after every epoch:
   the fast recipe's `eval_every` 0 is set to 1 for the curve). After each epoch: the test accuracy and the CPU
   seconds of training so far (the evaluation passes not counted); the first CPU second at which each recipe
   reaches 95% and 97%, and its final accuracy per CPU minute.

The machine's load average is recorded before and after. Speed is asserted nowhere: this script only measures and
records.

    python benchmarks/fast_cpu.py                          # both parts: about 10 CPU-minutes
    python benchmarks/fast_cpu.py --rounds 3 --no-runs     # the step times only
"""
from __future__ import annotations
import argparse, dataclasses, datetime, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path
import cifar_kit  # noqa: F401  first: the face registers everything (and makes torchvision importable)
import torch
from cifar_kit.core import seed_everything, num_params
from cifar_kit.config import config_from, validate_config
from cifar_kit.learner import Callback, Learner, MetricsCB
from cifar_kit.callbacks import NaNGuardCB
from cifar_kit.train import setup, partial_ce, option_callbacks, train, Take
from cifar_kit.run.files import device_name, git_commit, unwrap_model   # what run records say of the machine and code

ROOT = Path(__file__).resolve().parent.parent
FAST, SEED = 'airbench94-c10', 'resnet20-digits'
THRESHOLDS = (95.0, 97.0)   # test accuracy, %: one test image of the digits is 0.28%


def recipes(fast_batch:int, **run)->dict:
    "The two configs on the digits: the fast recipe re-targeted (data set, batch), the seed's as it is"
    fast = config_from(FAST, **run)
    fast = validate_config(dataclasses.replace(fast, recipe='', dataset='digits', norm=None, batch_size=fast_batch,
                                               whiten_init=min(fast.whiten_init, 1437)))   # the digits have 1,437
    return {'fast': fast, 'seed': config_from(SEED, **run)}


class ClockCB(Callback):
    "After each epoch: the CPU seconds spent in training passes so far and the test top-1 (evaluation not counted)"
    order = 100   # after MetricsCB has written the epoch's row
    def __init__(self): self.cpu, self.rows = 0.0, []
    def before_train(self): self.t0 = time.process_time()
    def after_train(self): self.cpu += time.process_time() - self.t0
    def after_epoch(self):
        self.rows.append({'epoch': self.learn.epoch, 'train_cpu_s': self.cpu,
                          'test_top1': self.learn.history[-1].get('test_top1')})


def learner(c)->tuple[Learner, dict]:
    "A learner of config `c` as `train()` builds it, without the run folder's writers; and setup's dict"
    seed_everything(c.seed)
    s = setup(c)
    L = s['loaders']
    cbs = [MetricsCB(L.num_classes), NaNGuardCB(), *option_callbacks(c, L.num_classes)]
    learn = Learner(s['model'], L.train, {'test': L.test}, partial_ce(c.label_smoothing), s['opt'], s['sched'], cbs,
                    sched_per_step=c.sched_per_step)
    return learn, s


def steps(learn:Learner, n:int)->tuple[int, float, float]:
    "`n` training steps (full batches) as an epoch runs them: (images, CPU seconds, wall seconds)"
    if n >= len(learn.train_dl):
        raise ValueError(f"--steps {n}: an epoch has {len(learn.train_dl) - 1} full batches; give fewer steps")
    dl = Take(learn.train_dl, n)
    learn('before_epoch'); learn('before_train')
    t0, w0 = time.process_time(), time.perf_counter()
    learn._run_batches(dl, True)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    learn('after_train')
    learn.epoch += 1
    return n * learn.train_dl.batch_size, cpu, wall


def step_times(cfgs:dict, rounds:int, n:int, log=print)->dict:
    "Interleaved rounds (A B B A ...) of `n` steps of each config after one warm-up round: per-step and per-image"
    learns = {k: learner(c)[0] for k, c in cfgs.items()}
    for k, learn in learns.items():   # warm-up: before_fit (whitening, Lookahead's copy), the first steps' caches
        learn.n_epochs = 10**6; learn('before_fit'); steps(learn, n)
        log(f'  warm-up {k}: done')
    out = {k: {'cpu_s': [], 'wall_s': [], 'images': []} for k in learns}
    names = list(learns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            images, cpu, wall = steps(learns[k], n)
            out[k]['cpu_s'].append(cpu); out[k]['wall_s'].append(wall); out[k]['images'].append(images)
        log(f"  round {r + 1}/{rounds}: " + ', '.join(f"{k} {out[k]['cpu_s'][-1] / n:.3f} CPU s/step" for k in names))
    for k, o in out.items():
        o['cpu_s_per_step'] = statistics.median(s / n for s in o['cpu_s'])
        o['cpu_ms_per_image'] = statistics.median(1000 * s / i for s, i in zip(o['cpu_s'], o['images']))
        o['wall_s_per_step'] = statistics.median(s / n for s in o['wall_s'])
        o['batch_size'] = learns[k].train_dl.batch_size
        o['params'] = num_params(unwrap_model(learns[k].model))
    ratio = lambda key: [f / s for f, s in zip(out['fast'][key], out['seed'][key])]
    out['ratio_fast_over_seed'] = {
        'cpu_per_step': statistics.median(ratio('cpu_s')),
        'cpu_per_image': statistics.median(f / s * si / fi for f, s, fi, si in
                                           zip(out['fast']['cpu_s'], out['seed']['cpu_s'],
                                               out['fast']['images'], out['seed']['images'])),
        'wall_per_step': statistics.median(ratio('wall_s'))}
    return out


def accuracy_per_second(cfgs:dict, log=print)->dict:
    "One full run of each config, evaluated every epoch: test top-1 against the training CPU seconds so far"
    out = {}
    for k, c in cfgs.items():
        clock = ClockCB()
        c = dataclasses.replace(c, run_dir=tempfile.mkdtemp(prefix=f'cifar_kit_fast_cpu_{k}_'), progress='off',
                                **({'eval_every': 1} if getattr(c, 'eval_every', 1) != 1 else {}))
        t0 = time.process_time()
        run = train(c, cbs=[clock])
        first = {str(t): next((r['train_cpu_s'] for r in clock.rows if (r['test_top1'] or 0) >= t), None)
                 for t in THRESHOLDS}
        final = clock.rows[-1]
        out[k] = {'epochs': c.epochs, 'batch_size': c.batch_size, 'curve': clock.rows,
                  'final_test_top1': final['test_top1'], 'train_cpu_s': final['train_cpu_s'],
                  'run_cpu_s': time.process_time() - t0,   # with evaluation, checkpoints, plots
                  'top1_per_train_cpu_minute': final['test_top1'] / (final['train_cpu_s'] / 60),
                  'first_train_cpu_s_at': first, 'status': run.record.get('status')}
        log(f"  {k}: {final['test_top1']:.2f}% after {c.epochs} epochs, {final['train_cpu_s']:.0f} CPU s of training; "
            + ', '.join(f"{t}% at {s:.0f} s" if s is not None else f"{t}% never" for t, s in first.items()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=5, help='interleaved rounds of the step timing (default 5)')
    ap.add_argument('--steps', type=int, default=8, help='training steps per round and recipe (default 8)')
    ap.add_argument('--fast-batch', type=int, default=128, help="the fast recipe's batch on the digits (default 128)")
    ap.add_argument('--no-runs', action='store_true', help='skip part 2, the full runs')
    ap.add_argument('--out', help='output JSON (default benchmarks/results/fast-cpu-<date>.json)')
    a = ap.parse_args(argv)
    load0, t_start, c_start = list(os.getloadavg()), time.perf_counter(), time.process_time()
    commit = git_commit()['commit']   # the code as it starts (a commit made while it runs is not what ran)
    cfgs = recipes(a.fast_batch, device='cpu', progress='off')
    print(f"step time: {a.rounds} rounds of {a.steps} steps", flush=True)
    st = step_times(cfgs, a.rounds, a.steps)
    if not a.no_runs: print("accuracy per CPU second: one run of each", flush=True)
    acc = None if a.no_runs else accuracy_per_second(cfgs)
    setup_of = lambda c: {k: getattr(c, k) for k in ('arch', 'dataset', 'epochs', 'batch_size', 'lr', 'momentum', 'wd',
                                                     'nesterov', 'schedule', 'label_smoothing', 'flip', 'pad',
                                                     'pad_mode', 'tta') if hasattr(c, k)}
    rec = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
           'command': 'python benchmarks/fast_cpu.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
           'git_commit': commit,
           'machine': {'cpu': device_name('cpu'), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                       'platform': platform.platform(), 'python': platform.python_version(), 'torch': torch.__version__,
                       'loadavg_start': load0, 'loadavg_end': list(os.getloadavg()),
                       'env': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY')}},
           'recipes': {'fast': FAST + ' on digits', 'seed': SEED},
           'setup': {k: setup_of(c) | {'options': dict(getattr(c, 'options', {}) or {})} for k, c in cfgs.items()},
           'step_time': {'rounds': a.rounds, 'steps_per_round': a.steps, **st},
           'accuracy_per_second': acc,
           'wall_s': time.perf_counter() - t_start, 'cpu_s': time.process_time() - c_start}
    out = Path(a.out) if a.out else ROOT/'benchmarks'/'results'/f"fast-cpu-{rec['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + '\n')
    r = st['ratio_fast_over_seed']
    print(f"a fast step costs {r['cpu_per_step']:.2f} x a seed step in CPU time ({r['cpu_per_image']:.2f} x per image; "
          f"batches {st['fast']['batch_size']} and {st['seed']['batch_size']})")
    print(f"wrote {out}")
    return rec


if __name__ == '__main__': main()
