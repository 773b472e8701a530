"""Trust, round 3, the data and a run's settings: CIFAR pickles checked for structure before they are converted, DataLoader
workers capped at the CPUs, 16-bit grey images read by their range, and a run resumed only under the settings its
checkpoint was trained with."""
import json, os, pickle
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from cifar_kit.data.readers import safe_unpickle, write_fake_cifar, write_fake_imagefolder, get_imagefolder
from cifar_kit.data.registry import DatasetError, get_dataset
from cifar_kit.config import config_from
from cifar_kit.train import setup, train
from cli_helpers import one_line_error
from run_helpers import TINY, snapshot

CLI = ['--recipe', 'resnet20-digits', '--device', 'cpu', '--progress', 'off', '--deterministic', '--limit-batches', '1']



def _rewrite(folder:Path, fname:str, **changes):
    d = safe_unpickle(folder/fname); d.update(changes)
    (folder/fname).write_bytes(pickle.dumps(d, protocol=2))


def shared_lists(depth:int, row:int=3072, n:int=100)->list:
    "A list of `row` zeros, held `n` times by a list, that one `n` times, ... `depth` times: one list object per level"
    v = [0] * row
    for _ in range(depth): v = [v] * n
    return v


# ---------------------------------------------------------------- 1: a CIFAR pickle's structure

@pytest.mark.parametrize('fname, key, value, needle', [
    # four references to one row: a 4×3072 list of lists, which the real files never hold
    ('data_batch_2', 'data', shared_lists(1, n=4), "'data' must be an N×3072 array of pixel values"),
    ('test_batch', 'labels', shared_lists(1, row=1, n=4), 'the labels (10 class names) must be a flat list of numbers'),
    ('data_batch_2', 'data', np.zeros(4 * 3072, np.uint8), "it is an array of shape (12288,)"),
    ('data_batch_2', 'data', bytes(3000), "it is 3,000 bytes, not a multiple of 3072"),
    ('test_batch', 'labels', [0, 1, 2], '4 images but 3 labels'),
    # 100×100×100×3072 values, four list objects: 7 KB of pickle
    ('data_batch_2', 'data', shared_lists(3), "'data' must be an N×3072 array of pixel values"),
    ('test_batch', 'labels', shared_lists(3), 'must be a flat list of numbers, one per image; it is a list holding a list'),
])
def test_cifar_structure_refused_before_conversion(tmp_path, fname, key, value, needle):
    folder = write_fake_cifar(tmp_path, n=4)
    _rewrite(folder, fname, **{key: value})
    assert (folder/fname).stat().st_size < 30_000   # 4 images (12 KB) and the lists
    before = snapshot(folder)
    with pytest.raises(DatasetError) as e: get_dataset('cifar10', tmp_path, train=fname != 'test_batch')
    msg = str(e.value)
    assert needle in msg and fname in msg and '\n' not in msg, msg
    assert snapshot(folder) == before


def test_cifar_bytes_data_reads_as_its_array(tmp_path):
    "Raw bytes are a bounded form of the pixels too: the same images as the array they were made from"
    folder = write_fake_cifar(tmp_path, n=4)
    want = get_dataset('cifar10', tmp_path)
    for i in range(1, 6): _rewrite(folder, f'data_batch_{i}', data=safe_unpickle(folder/f'data_batch_{i}')['data'].tobytes())
    got = get_dataset('cifar10', tmp_path)
    assert got.images.equal(want.images) and got.labels.equal(want.labels)


def test_train_refuses_the_hostile_pickle_in_one_line(tmp_path, capsys):
    data = tmp_path/'data'
    folder = write_fake_cifar(data, n=4)
    _rewrite(folder, 'data_batch_2', data=shared_lists(3))
    one_line_error(capsys, 'train', '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', data, '--epochs', '1',
                   '--device', 'cpu', '--progress', 'off', '--out-dir', tmp_path/'run',
                   contains="data_batch_2: 'data' must be an N×3072 array")


# ---------------------------------------------------------------- 2: workers capped at the CPUs

def test_workers_capped_at_the_cpus_with_one_line(monkeypatch, capsys):
    "--workers 100000 --feeder torch: as many workers as CPUs, one warning line; no worker starts here"
    from cifar_kit.data.feeders import usable_cpus
    if hasattr(os, 'sched_getaffinity'): monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2})
    else: monkeypatch.setattr(os, 'cpu_count', lambda: 3)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert usable_cpus() == 3
    c = config_from('resnet20-digits', feeder='torch', num_workers=100_000, device='cpu', progress='off')
    capsys.readouterr()
    s = setup(c)
    assert [s['loaders'].train.dl.num_workers, s['loaders'].test.dl.num_workers] == [3, 3]
    assert capsys.readouterr().err == "warning: --workers 100000 is more than the 3 CPUs this process can use; using 3\n"
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')   # two ranks on this machine: one CPU each (3 // 2)
    s = setup(c, rank=1)
    assert s['loaders'].train.dl.num_workers == 1 and capsys.readouterr().err == ''   # rank 1 is quiet
    s = setup(config_from('resnet20-digits', feeder='torch', num_workers=1, device='cpu'))
    assert s['loaders'].train.dl.num_workers == 1 and capsys.readouterr().err == ''   # within the CPUs: as asked


# ---------------------------------------------------------------- 3: 16-bit grey images

def test_16bit_grey_png_scaled_by_its_range(tmp_path):
    root = write_fake_imagefolder(tmp_path/'f', n_per_class=1, classes=('ant', 'bee'), size=16)
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    p = root/'train'/'ant'/'grey16.png'
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode == 'I;16'
    ds = get_imagefolder(root)
    path, y = next((s, y) for s, y in ds.samples if s.endswith('grey16.png'))
    rgb = np.asarray(ds.loader(path))
    want = [[round(v / 257) for v in row] for row in ramp.tolist()]   # the naive rule, value by value
    assert rgb.shape == (16, 16, 3) and all(rgb[..., k].tolist() == want for k in range(3)) and y == 0
    assert rgb.min() == 0 and rgb.max() == 255


def test_32bit_image_refused_in_one_line(tmp_path):
    root = write_fake_imagefolder(tmp_path/'f', n_per_class=1, classes=('ant', 'bee'), size=16)
    p = root/'train'/'bee'/'deep.tif'
    Image.fromarray(np.full((16, 16), 70_000, np.int32)).save(p)
    ds = get_imagefolder(root)
    with pytest.raises(DatasetError) as e: ds.loader(str(p))
    msg = str(e.value)
    assert str(p) in msg and '32-bit integers (PIL mode I)' in msg and 'save it as an 8-bit image' in msg and '\n' not in msg


# ---------------------------------------------------------------- 4: a config changed under a run

def _edit(run:Path, **changes):
    cfg = json.loads((run/'config.json').read_text()); cfg.update(changes)
    (run/'config.json').write_text(json.dumps(cfg, indent=1))


def test_config_edited_under_a_run_is_refused_and_nothing_changes(tmp_path, capsys):
    "config.json edited from lr 0.05 to 0.1, then the run extended: refused, every file as it was"
    d = tmp_path/'run'
    train(**TINY, epochs=1, run_dir=str(d))
    _edit(d, lr=0.1, wd=0.001)
    before = snapshot(d)
    with pytest.raises(ValueError) as e: train(**TINY, epochs=2, lr=0.1, wd=0.001, run_dir=str(d))
    msg = str(e.value)
    assert f"{d/'last.pt'} was trained with other settings than this run asks for (lr: 0.05 -> 0.1; wd: 0.0005 -> 0.001)" in msg
    assert 'put them back in config.json' in msg and '--out-dir' in msg and '\n' not in msg
    assert snapshot(d) == before
    one_line_error(capsys, 'train', '--config', d/'config.json', '--epochs', '2', contains='(lr: 0.05 -> 0.1; wd: 0.0005 -> 0.001)')
    assert snapshot(d) == before
    # the original values put back: the run resumes, its plan change recorded as before
    _edit(d, lr=0.05, wd=0.0005)
    run = train(**TINY, epochs=2, run_dir=str(d))
    assert len(run.history) == 2 and [round(r['lr'], 6) for r in run.history] == [0.05, 0.05]
    assert run.record['plan_changes'] == [{'at_epoch': 1, 'from': {'epochs': 1, 'milestones': []},
                                           'to': {'epochs': 2, 'milestones': []}}]


def test_how_a_run_runs_may_change_on_resume(tmp_path):
    "Settings declared run_only (device, workers, progress, eval batch) are not training settings: a resume accepts them"
    d = tmp_path/'run'
    train(**TINY, epochs=1, run_dir=str(d))
    run = train(**TINY | dict(eval_batch_size=256), epochs=2, num_workers=0, run_dir=str(d))
    assert len(run.history) == 2
