"""The command line: every setting reachable, `--config` round trips, timm's names, one-line errors, signals' exit codes."""
import dataclasses, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
import cifar_kit
from cli_helpers import run_cli, one_line_error, as_at_a_terminal
import cifar_kit.cli as cli
from cifar_kit.cli import command_parser, COMMANDS
from cifar_kit.core import list_models, create_model, num_params
from cifar_kit.config import TrainConfig, config_from
from cifar_kit.run.files import read_history

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
TINY = ['--recipe', 'resnet20-digits', '--epochs', '1', '--limit-batches', '3', '--deterministic', '--progress', 'off',
        '--eval-batch-size', '512', '--device', 'cpu']


def weights(path):
    return torch.load(path, weights_only=True)['model']


# ---------------------------------------------------------------- every setting is a flag

def test_every_trainconfig_field_is_a_flag_of_train():
    "A new TrainConfig field without a flag fails here"
    dests = {a.dest for a in command_parser('train')._actions}
    assert FIELDS <= dests, FIELDS - dests


def test_every_trainconfig_field_is_a_flag_of_distill():
    "distill has its own --recipe (a distillation recipe) and --dataset, and --student for the arch (--arch too)"
    p = command_parser('distill')
    dests = {a.dest for a in p._actions}
    assert FIELDS - {'recipe', 'dataset'} <= dests, FIELDS - dests
    assert {'recipe', 'dataset', 'student', 'teacher', 'config'} <= dests


@pytest.mark.parametrize('cmd', list(COMMANDS))
def test_every_command_help_lists_its_options(capsys, cmd):
    code, out, _ = run_cli(capsys, cmd, '--help')
    assert code == 0
    for a in command_parser(cmd)._actions:
        if a.help != '==SUPPRESS==': assert all(s in out for s in a.option_strings), (cmd, a.option_strings)


def test_top_level_help_shows_every_command_and_version(capsys):
    code, out, _ = run_cli(capsys, '--help')
    assert code == 0 and '(see' not in out
    for name in COMMANDS: assert f'  {name:9s} {cli._command(name).__doc__}' in out
    code, out, _ = run_cli(capsys, '--version')
    assert code == 0 and out.strip() == f'cifar-kit {cifar_kit.__version__}'


def test_timm_names_give_the_same_config():
    ours = ['--arch', 'resnet20', '--dataset', 'digits', '--batch-size', '64', '--workers', '2', '--schedule', 'cosine',
            '--wd', '1e-4', '--label-smoothing', '0.1', '--warmup-epochs', '2', '--out-dir', 'x', '--milestones', '3',
            '--channels-last', 'on']
    timm = ['--model', 'resnet20', '--dataset', 'digits', '-b', '64', '-j', '2', '--sched', 'cosine', '--weight-decay', '1e-4',
            '--smoothing', '0.1', '--warmup-epochs', '2', '--output', 'x', '--decay-milestones', '3', '--channels-last']
    cfg = lambda argv: cli.settings_config(None, {k: v for k, v in vars(command_parser('train').parse_args(argv)).items() if k in FIELDS})
    c = cfg(ours)
    assert c == cfg(timm)
    assert (c.batch_size, c.num_workers, c.schedule, c.wd, c.label_smoothing, c.warmup_epochs, c.run_dir, c.milestones, c.channels_last) == \
           (64, 2, 'cosine', 1e-4, 0.1, 2, 'x', (3,), 'on')


def test_settings_unreachable_before_are_reachable():
    "schedule, milestones, gamma, momentum, warmup, smoothing, channels_last, model kwargs, and the rest"
    argv = ['--recipe', 'wrn28_10-c10', '--schedule', 'cosine', '--milestones', '5', '7', '--gamma', '0.5', '--momentum', '0.8',
            '--warmup-epochs', '1', '--label-smoothing', '0.2', '--channels-last', 'off', '--model-kwargs', '{"drop": 0.1}',
            '--feeder', 'torch', '--eval-batch-size', '256', '--val-size', '100', '--epochs', '10', '--no-compile', '--sync-bn']
    a = {k: v for k, v in vars(command_parser('train').parse_args(argv)).items() if k in FIELDS}
    c = cli.settings_config(None, a)
    assert (c.schedule, c.milestones, c.gamma, c.momentum, c.warmup_epochs, c.label_smoothing, c.channels_last, c.model_kwargs,
            c.feeder, c.eval_batch_size, c.val_size, c.compile, c.sync_bn) == \
           ('cosine', (5, 7), 0.5, 0.8, 1, 0.2, 'off', {'drop': 0.1}, 'torch', 256, 100, False, True)
    a = vars(command_parser('train').parse_args(['--model-kwargs', 'drop=0.3', 'block=basic']))
    assert a['model_kwargs'] == {'drop': 0.3, 'block': 'basic'}


# ---------------------------------------------------------------- --config

def test_config_json_round_trip_reproduces_the_run(capsys, tmp_path):
    "A run's config.json is a valid --config: the rerun into another folder has the same config and, deterministic, the same weights"
    a, b = tmp_path/'a', tmp_path/'b'
    code, out, err = run_cli(capsys, 'train', *TINY, '--out-dir', a)
    assert code == 0, err
    code, out, err = run_cli(capsys, 'train', '--config', a/'config.json', '--out-dir', b)
    assert code == 0, err
    ca, cb = json.loads((a/'config.json').read_text()), json.loads((b/'config.json').read_text())
    assert ca.pop('run_dir') == str(a) and cb.pop('run_dir') == str(b)
    assert ca == cb
    wa, wb = weights(a/'last.pt'), weights(b/'last.pt')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same file without --out-dir is the same run: nothing to do
    code, out, _ = run_cli(capsys, 'train', '--config', a/'config.json')
    assert code == 0 and 'already holds the finished run' in out


def test_flags_override_the_config_file(tmp_path):
    (tmp_path/'c.json').write_text(json.dumps({'recipe': 'resnet20-digits', 'epochs': 3, 'lr': 0.02, 'seed': 4}))
    c = cli.settings_config(tmp_path/'c.json', {'lr': 0.05})
    assert (c.recipe, c.epochs, c.lr, c.seed) == ('resnet20-digits', 3, 0.05, 4)


@pytest.mark.parametrize('text, contains', [
    (None, 'no config file at'),
    ('', 'is not valid JSON'),
    ('{"epochs": 3', 'is not valid JSON'),
    ('[1, 2]', 'one JSON object'),
    ('{"recipe": "resnet20-digits", "epoch": 3}', "unknown setting(s) ['epoch']"),
    ('{"recipe": "resnet20-digits", "epochs": "3"}', "epochs must be <class 'int'>, got '3'"),
    ('{"recipe": "resnet20-digits", "epochs": 0}', 'epochs must be a positive integer'),
])
def test_bad_config_files(capsys, tmp_path, text, contains):
    f = tmp_path/'config.json'
    if text is not None: f.write_text(text)
    msg = one_line_error(capsys, 'train', '--config', f, '--out-dir', tmp_path/'run', contains=contains)
    if text is not None and 'positive' not in contains: assert str(f) in msg
    assert not (tmp_path/'run').exists()


# ---------------------------------------------------------------- one-line errors that name flags

@pytest.mark.parametrize('argv, contains', [
    (['--device', 'meta'], "device 'meta' cannot train a model: use --device"),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['--seed', str(2**64)], 'seed must be below 2**63'),
    (['--seed', '-1'], 'seed must be an integer >= 0'),
    (['--model-kwargs', 'drop'], 'key=value'),
    (['--recipe', 'resnet164-c10', '--dataset', 'cifar100'], "drop --dataset or the recipe"),
])
def test_bad_settings_are_one_line(capsys, tmp_path, argv, contains):
    one_line_error(capsys, 'train', '--recipe', 'resnet20-digits', *argv, '--out-dir', tmp_path/'run', contains=contains)
    assert not (tmp_path/'run').exists()


def test_tensorboard_missing_names_the_extra(capsys, tmp_path, monkeypatch):
    import cifar_kit.config
    monkeypatch.setattr(cifar_kit.config, 'find_spec', lambda name: None if name == 'tensorboard' else __import__('importlib').util.find_spec(name))
    msg = one_line_error(capsys, 'train', *TINY, '--tensorboard', '--out-dir', tmp_path/'run', contains='tensorboard is not installed')
    assert 'pip install "cifar_kit[tensorboard]"' in msg and not (tmp_path/'run').exists()


def test_library_messages_show_flags(capsys, tmp_path):
    "`download=True` and `root=` in a library message are shown as --download and --data-dir"
    msg = one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', tmp_path/'nowhere',
                         '--out-dir', tmp_path/'run', contains='does not exist')
    assert '--download' in msg and 'download=True' not in msg and 'root=' not in msg
    code, out, _ = run_cli(capsys, 'eval', '--help')
    assert code == 0 and '--download' in out          # eval has the flag its messages suggest


def test_eval_takes_the_checkpoint_as_argument_or_flag(capsys, tmp_path):
    assert run_cli(capsys, 'train', *TINY, '--out-dir', tmp_path/'r')[0] == 0
    code, out, _ = run_cli(capsys, 'eval', tmp_path/'r'/'last.pt')
    code2, out2, _ = run_cli(capsys, 'eval', '--checkpoint', tmp_path/'r'/'last.pt')
    assert code == code2 == 0 and out == out2 and 'top-1' in out
    one_line_error(capsys, 'eval', contains='cifar-kit eval PATH')


def test_first_line_states_global_and_per_process_batch(capsys, tmp_path):
    code, out, _ = run_cli(capsys, 'train', *TINY, '--batch-size', '32', '--out-dir', tmp_path/'r')
    assert code == 0
    assert out.splitlines()[0] == f"training resnet20-digits: 1 epochs, global batch 32 = 1 process x 32 per process; run folder {tmp_path/'r'}"


# ---------------------------------------------------------------- models

def test_models_lists_real_parameter_counts_without_building_them(capsys):
    "Counted on the meta device; each equals the count of the really built model"
    code, out, _ = run_cli(capsys, 'models')
    assert code == 0
    listed = {l.split()[0]: int(l.split()[1].replace(',', '')) for l in out.splitlines()}
    assert list(listed) == list_models()
    for name, n in listed.items():
        assert n == num_params(create_model(name)), name
    assert cli.models_cmd('resnet20', num_classes=100)[0][1] == num_params(create_model('resnet20', 100))


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_interrupt_exit_status(capsys, monkeypatch, signum, status):
    "An interrupt with a signal number (as the run's own handlers raise it) exits 128 + signal, one line"
    def stop(c, **kw):
        e = KeyboardInterrupt(); e.signum, e.epoch, e.epochs = signum, 3, 164; raise e
    monkeypatch.setattr(cli, 'train', stop)
    code, out, err = run_cli(capsys, 'train', '--recipe', 'resnet164-c10')
    assert code == status
    assert err.strip() == f"interrupted at epoch 3/164 by {signal.Signals(signum).name}; rerun the same command to resume"


def _wait_for(path, p, limit=600):
    "Wait until `path` exists (the run's own progress), or the process ended"
    t = time.monotonic()
    while not path.exists() and p.poll() is None and time.monotonic() - t < limit: time.sleep(0.05)


def _communicate_or_dump(p, timeout):
    "`p.communicate()`; if `p` is still running after `timeout` s, fail with every thread's stack (`-X faulthandler` prints them on SIGABRT)"
    try: return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT); out, err = p.communicate(timeout=60)
        pytest.fail(f"still running {timeout} s after the signal; its threads:\n{err[-6000:]}")


def _long_run(run_dir, preexec_fn=as_at_a_terminal):
    "`cifar-kit train` of 1000 one-batch epochs into `run_dir`, in a child whose threads' stacks a SIGABRT prints"
    return subprocess.Popen([sys.executable, '-X', 'faulthandler', '-m', 'cifar_kit', 'train', '--recipe', 'resnet20-digits',
                             '--epochs', '1000', '--limit-batches', '1', '--eval-batch-size', '512', '--progress', 'off',
                             '--device', 'cpu', '--out-dir', str(run_dir)], env=dict(os.environ, OMP_NUM_THREADS='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGHUP', 'SIGINT'])
def test_signal_ends_a_real_run_with_one_line(tmp_path, sig):
    "After the first epoch's history is written, the signal stops the run: one line, 128 + signal, checkpoint and record kept"
    run_dir = tmp_path/'run'
    p = _long_run(run_dir)
    _wait_for(run_dir/'history.csv', p)
    assert p.poll() is None, p.communicate()
    p.send_signal(getattr(signal, sig))
    out, err = _communicate_or_dump(p, 300)
    assert p.returncode == 128 + getattr(signal, sig), err
    lines = [l for l in err.splitlines() if l.strip()]
    assert 'Traceback' not in err and lines[-1].startswith('interrupted at epoch ') and f'by {sig}; rerun the same command' in lines[-1], err
    rec = json.loads((run_dir/'run.json').read_text())
    assert rec['status'] == 'interrupted' and rec['epochs'] >= 1
    assert torch.load(run_dir/'last.pt', weights_only=True)['epoch'] >= 1


def _epochs_written(run_dir)->int:
    return len(read_history(run_dir/'history.csv')) if (run_dir/'history.csv').exists() else 0   # written atomically


def test_a_run_under_nohup_outlives_its_terminal(tmp_path):
    "SIGHUP ignored (`nohup cifar-kit train ... &`) stays ignored: the run trains on after a hangup, and SIGTERM still ends it"
    def nohup(): as_at_a_terminal(); signal.signal(signal.SIGHUP, signal.SIG_IGN)
    run_dir = tmp_path/'run'
    p = _long_run(run_dir, nohup)
    _wait_for(run_dir/'history.csv', p)
    p.send_signal(signal.SIGHUP)
    hung_up_at, t = _epochs_written(run_dir), time.monotonic()
    while _epochs_written(run_dir) < hung_up_at + 3 and p.poll() is None and time.monotonic() - t < 600: time.sleep(0.05)
    assert p.poll() is None and _epochs_written(run_dir) >= hung_up_at + 3, p.communicate()   # three more epochs since the hangup
    p.send_signal(signal.SIGTERM)
    out, err = _communicate_or_dump(p, 300)
    assert p.returncode == 128 + signal.SIGTERM and err.splitlines()[-1].endswith('by SIGTERM; rerun the same command to resume'), err
