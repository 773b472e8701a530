"""Trust, round 3, models and their files: a number of classes, a batch size and model arguments refused in one line
before anything is built, an export that never replaces a file it did not write, and a distillation that resumes
only with the teacher file it started from."""
import hashlib, json, shutil
from pathlib import Path
import pytest
import torch
from cifar_kit.core import create_model
from cifar_kit.config import config_from
from cifar_kit.train import train
from cifar_kit.run.files import load_checkpoint_file
from cli_helpers import one_line_error
from run_helpers import snapshot

TINY = dict(recipe='resnet20-digits', epochs=1, limit_batches=1, deterministic=True, progress='off', device='cpu',
            eval_batch_size=512)



@pytest.fixture(scope='module')
def run_dir(tmp_path_factory)->Path:
    "A finished one-epoch digits run of resnet20 (one batch)"
    d = tmp_path_factory.mktemp('models3')/'run'
    train(config_from(**TINY, run_dir=str(d)))
    return d


def with_model_kwargs(run_dir:Path, dest:Path, **model_kwargs)->Path:
    "A copy of the run's last.pt whose config carries `model_kwargs`"
    ckpt = load_checkpoint_file(run_dir/'last.pt')
    ckpt['config'] = dict(ckpt['config'], model_kwargs=model_kwargs)
    torch.save(ckpt, dest)
    return dest


# ---------------------------------------------------------------- 1: numbers of classes and batch sizes

@pytest.mark.parametrize('n', [0, -5, True, 10**11, 2.0])
def test_create_model_refuses_a_number_of_classes(n):
    with pytest.raises(ValueError) as e: create_model('resnet20', num_classes=n)
    msg = str(e.value)
    assert msg.startswith(f'num_classes={n!r} is not a number of classes from 1 to 100,000') and '\n' not in msg, msg


@pytest.mark.parametrize('n', ['0', '-5'])
def test_models_command_refuses_a_number_of_classes(capsys, n):
    one_line_error(capsys, 'models', 'resnet2*', f'--num-classes={n}', contains=f'num_classes={n} is not a number of classes')


@pytest.mark.parametrize('value', ['true', '100000000000'])
def test_export_config_num_classes_refused_before_the_model_is_built(run_dir, tmp_path, value):
    from cifar_kit.hub import export
    out = export(run_dir, tmp_path/'shared')
    cfg = (out/'config.json').read_text()
    (out/'config.json').write_text(cfg.replace('"num_classes": 10,', f'"num_classes": {value},', 1))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e: create_model('resnet20', pretrained=out)
    msg = str(e.value)
    assert f"config.json says num_classes={json.loads(value)!r} is not a number of classes" in msg, msg
    assert 'export the weights again' in msg and '\n' not in msg
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('bs', [-1, 0, True])
def test_evaluation_batch_size_refused_before_any_file_is_read(tmp_path, bs):
    from cifar_kit.evaluate import evaluate_suite
    try: from cifar_kit.data.more_readers import write_fake_cifar_c
    except ImportError: from cifar_kit.data.readers import write_fake_cifar_c   # before the data wing's split
    write_fake_cifar_c(tmp_path, n=4, corruptions=('fog',))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e: evaluate_suite(torch.nn.Flatten(), 'cifar10c', tmp_path, 'cpu', batch_size=bs)
    assert str(e.value).startswith(f'batch_size={bs!r} is not a batch size: give a whole number of images'), e.value
    assert snapshot(tmp_path) == before
    from cifar_kit.evaluate import check_batch_size   # here, so the file collects on older code
    with pytest.raises(ValueError, match=r'^--batch-size=-1 is not a batch size'): check_batch_size(-1, '--batch-size')


# ---------------------------------------------------------------- 2: model arguments

@pytest.mark.parametrize('kw, needle', [
    ({'bogus': 1}, "model 'resnet20' takes no keyword argument 'bogus'; it takes ['block', "),
    ({'depth': 10**6}, 'resnet20 sets depth itself, so model_kwargs cannot (depth=1000000)'),
    ({'shortcut': 3}, "model 'resnet20': shortcut=3 should be a str like its default 'B'"),
])
def test_create_model_refuses_model_kwargs(kw, needle):
    with pytest.raises(ValueError) as e: create_model('resnet20', **kw)
    assert needle in str(e.value) and '\n' not in str(e.value), e.value


def test_wide_argument_bounded_and_recipes_kwargs_still_pass():
    from cifar_kit.core import check_model_kwargs
    from cifar_kit.recipes import RECIPES
    with pytest.raises(ValueError, match=r"compression=1000000 is over 32 \(16x its default 2\)"):
        check_model_kwargs('densenet_bc_100_12', {'compression': 10**6})
    for name, r in RECIPES.items(): assert check_model_kwargs(r.arch, r.model_kwargs) == r.model_kwargs, name
    assert create_model('wrn16_2', drop=0.3).num_classes == 10


@pytest.mark.parametrize('arg, needle', [
    ('bogus=1', "model 'resnet20' takes no"),
    ('num_classes=3', 'num_classes=3 in model_kwargs'),
    ('depth=1000000', 'resnet20 sets depth itself'),
])
def test_train_refuses_model_kwargs_flag_and_config(capsys, tmp_path, arg, needle):
    out = tmp_path/'run'
    line = one_line_error(capsys, 'train', '--recipe', 'resnet20-digits', '--device', 'cpu', '--progress', 'off',
                          '--run-dir', out, '--model-kwargs', arg, contains=needle)
    assert arg.split('=')[0] in line, line
    k, v = arg.split('=')
    cfg = tmp_path/'settings.json'
    cfg.write_text(json.dumps({'recipe': 'resnet20-digits', 'model_kwargs': {k: int(v)}}))
    before = snapshot(tmp_path)
    one_line_error(capsys, 'train', '--config', cfg, '--device', 'cpu', '--progress', 'off', '--run-dir', out,
                   contains=needle)
    assert not out.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize('kw, needle', [({'bogus': 1}, "takes no keyword argument 'bogus'"),
                                        ({'depth': 10**6}, 'resnet20 sets depth itself')])
def test_eval_refuses_a_checkpoints_model_kwargs(capsys, run_dir, tmp_path, kw, needle):
    ckpt = with_model_kwargs(run_dir, tmp_path/'last.pt', **kw)
    before = snapshot(tmp_path)
    one_line_error(capsys, 'eval', ckpt, '--device', 'cpu', contains=needle)
    assert snapshot(tmp_path) == before


def test_eval_refuses_num_classes_inside_a_checkpoints_model_kwargs(capsys, run_dir, tmp_path):
    ckpt = with_model_kwargs(run_dir, tmp_path/'last.pt', num_classes=3)
    one_line_error(capsys, 'eval', ckpt, '--device', 'cpu', contains='num_classes=3 in model_kwargs')


def test_eval_refuses_a_negative_batch_size_in_one_line(capsys, run_dir, tmp_path):
    before = snapshot(tmp_path)
    one_line_error(capsys, 'eval', run_dir/'last.pt', '--device', 'cpu', '--batch-size', '-1',
                   contains='--batch-size=-1 is not a batch size')
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 3: export writes only over its own files

def test_export_refuses_a_file_it_did_not_write(capsys, run_dir, tmp_path):
    out = tmp_path/'out'; out.mkdir()
    (out/'model.safetensors').write_bytes(b'somebody else\'s weights')
    before = snapshot(tmp_path)
    one_line_error(capsys, 'export', run_dir, out, contains=f"{out/'model.safetensors'} exists, and no export of this run wrote it")
    assert snapshot(tmp_path) == before


def test_export_refuses_another_runs_export_and_replaces_its_own(capsys, run_dir, tmp_path):
    from cifar_kit.hub import export
    out = export(run_dir, tmp_path/'out')
    mine = snapshot(out)
    other = tmp_path/'other-run'; shutil.copytree(run_dir, other)
    before = snapshot(tmp_path)
    one_line_error(capsys, 'export', other, out, contains=f"{out/'config.json'} is the export of another run ('resnet20')")
    assert snapshot(tmp_path) == before
    assert export(run_dir, out) == out and snapshot(out) == mine   # the same run again: the same two files


@pytest.mark.parametrize('name', ['model.safetensors', 'config.json'])
def test_export_never_writes_through_a_symlink(capsys, run_dir, tmp_path, name):
    out = tmp_path/'out'; out.mkdir()
    target = tmp_path/'precious.txt'; target.write_bytes(b'keep me')
    (out/name).symlink_to(target)
    before = snapshot(tmp_path)
    one_line_error(capsys, 'export', run_dir, out, contains=f"{out/name} is a symlink")
    assert snapshot(tmp_path) == before and (out/name).is_symlink()


# ---------------------------------------------------------------- 4: a distillation resumes with its own teacher only

def test_distill_resume_refuses_a_replaced_teacher(run_dir, tmp_path):
    from cifar_kit.distill import distill
    teacher = tmp_path/'teacher.pt'; shutil.copyfile(run_dir/'last.pt', teacher)
    kw = dict(teacher='resnet20', teacher_checkpoint=teacher, student='resnet20', dataset='digits',
              **{k: v for k, v in TINY.items() if k != 'recipe'})
    student = tmp_path/'student'
    distill(**kw, run_dir=str(student))
    old = hashlib.sha256(teacher.read_bytes()).hexdigest()
    ckpt = load_checkpoint_file(teacher)   # other weights at the same path
    ckpt['model'] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt['model'].items()}
    torch.save(ckpt, teacher)
    new = hashlib.sha256(teacher.read_bytes()).hexdigest()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e: distill(**(kw | dict(epochs=2)), run_dir=str(student))
    msg = str(e.value)
    assert msg == (f"{teacher.resolve()} is not the teacher this run was distilled from (sha256 {old[:12]}..., "
                   f"now {new[:12]}...): give the original teacher file, or another run_dir/--out-dir"), msg
    assert snapshot(tmp_path) == before
    assert json.loads((student/'distill.json').read_text()).get('teacher_sha256') == old
