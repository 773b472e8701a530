"""The data-set registry, SVHN and CIFAR-10.1 in their real formats, safe unpickling and read-time checks of data files."""
import io, os, pickle, struct, subprocess, sys
import numpy as np
import pytest
import torch
import cifar_kit  # noqa: F401  (installs the torchvision shim before torchvision is imported)
from cifar_kit.data.registry import DATASETS, NORMS, DatasetError, get_dataset, get_dataset_info, list_datasets, register_dataset, ImageSet, CIFAR_MEAN, CIFAR_STD
from cifar_kit.data.readers import safe_unpickle, write_fake_cifar, write_fake_imagefolder, get_imagefolder, CIFAR10_CLASSES
from cifar_kit.data.more_readers import write_fake_svhn, write_fake_cifar10_1
from cifar_kit.loaders import get_loaders, test_feeder


# --- Python 2 cPickle, protocol 2, written opcode by opcode (as the real CIFAR archives were) ---

def _py2(obj, out:io.BytesIO, memo:dict):
    "Write `obj` the way Python 2's cPickle.dump(obj, f, 2) did: str as BINSTRING, arrays through numpy.core.multiarray"
    w = out.write
    if isinstance(obj, np.ndarray):
        w(b'cnumpy.core.multiarray\n_reconstruct\n' + b'cnumpy\nndarray\n' + b'K\x00\x85' + b'U\x01b' + b'\x87R')
        w(b'(K\x01'); _py2(tuple(obj.shape), out, memo)
        w(b'cnumpy\ndtype\n' + b'U\x02u1K\x00K\x01\x87R' + b'(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb')
        w(b'\x89'); _py2(obj.tobytes(), out, memo); w(b'tb')   # state: (1, shape, dtype, fortran=False, raw bytes)
    elif isinstance(obj, (bytes, str)):
        b = obj if isinstance(obj, bytes) else obj.encode('latin1')
        w(b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b)
    elif isinstance(obj, bool): w(b'\x88' if obj else b'\x89')
    elif isinstance(obj, int): w(b'K' + bytes([obj]) if 0 <= obj < 256 else b'J' + struct.pack('<i', obj))
    elif isinstance(obj, tuple):
        w(b'('); [_py2(x, out, memo) for x in obj]; w(b't')
    elif isinstance(obj, list):
        w(b']('); [_py2(x, out, memo) for x in obj]; w(b'e')
    elif isinstance(obj, dict):
        w(b'}('); [(_py2(k, out, memo), _py2(v, out, memo)) for k, v in obj.items()]; w(b'u')
    else: raise TypeError(type(obj))

def py2_pickle(obj)->bytes:
    out = io.BytesIO(); out.write(b'\x80\x02'); _py2(obj, out, {}); out.write(b'.'); return out.getvalue()


def test_py2_pickles_load_as_the_originals(tmp_path):
    folder = write_fake_cifar(tmp_path, n=5, seed=3)
    want_tr, want_te = get_dataset('cifar10', tmp_path), get_dataset('cifar10', tmp_path, train=False)
    for f in folder.iterdir():   # rewrite every file as Python 2's cPickle wrote the originals
        d = safe_unpickle(f)
        f.write_bytes(py2_pickle(d))
    raw = (folder/'data_batch_1').read_bytes()
    assert b'cnumpy.core.multiarray\n_reconstruct' in raw and b'U\x0bbatch_label' in raw and b'T' in raw and b'_codecs' not in raw
    tr, te = get_dataset('cifar10', tmp_path), get_dataset('cifar10', tmp_path, train=False)
    assert torch.equal(tr.images, want_tr.images) and torch.equal(tr.labels, want_tr.labels) and tr.classes == CIFAR10_CLASSES
    assert torch.equal(te.images, want_te.images)


class _Payload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('fname', ['batches.meta', 'data_batch_1'])
def test_payload_in_a_cifar_file_never_runs(tmp_path, fname):
    folder = write_fake_cifar(tmp_path, n=4)
    marker = tmp_path/'ran'
    d = safe_unpickle(folder/fname); d['extra'] = _Payload(marker)
    (folder/fname).write_bytes(pickle.dumps(d, protocol=2))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DatasetError) as e: get_dataset('cifar10', tmp_path)
    msg = str(e.value)
    assert fname in msg and 'posix.system' in msg and '\n' not in msg
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before   # nothing written or deleted


def test_cli_refuses_a_payload(tmp_path):
    folder = write_fake_cifar(tmp_path, n=4)
    marker = tmp_path/'ran'
    d = safe_unpickle(folder/'batches.meta'); d['x'] = _Payload(marker)
    (folder/'batches.meta').write_bytes(pickle.dumps(d, protocol=2))
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'train', '--arch', 'resnet20', '--dataset', 'cifar10', '--data-dir', str(tmp_path),
                        '--epochs', '1', '--device', 'cpu', '--out-dir', str(tmp_path/'run')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'posix.system' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()


# --- read-time checks ---

def _rewrite(folder, fname, **changes):
    d = safe_unpickle(folder/fname); d.update(changes)
    (folder/fname).write_bytes(pickle.dumps(d, protocol=2))


@pytest.mark.parametrize('changes, train, needle', [
    (dict(data=np.full((4, 3072), 256, dtype=np.int64)), True, 'pixel values must be in 0..255, found 256..256'),
    (dict(data=np.full((4, 3072), -1, dtype=np.int16)), True, 'pixel values must be in 0..255'),
    (dict(labels=[0, 1.5, 2, 3]), False, 'must be whole numbers'),
    (dict(labels=[0, 1, 2, 12]), False, 'must be in 0..9, found 0..12'),
])
def test_bad_values_refused_at_read_time(tmp_path, changes, train, needle):
    folder = write_fake_cifar(tmp_path, n=4)
    _rewrite(folder, 'data_batch_3' if train else 'test_batch', **changes)
    with pytest.raises(DatasetError) as e: get_dataset('cifar10', tmp_path, train=train)
    assert needle in str(e.value) and ('data_batch_3' if train else 'test_batch') in str(e.value) and '\n' not in str(e.value)


def test_fewer_class_names_than_labels(tmp_path):
    folder = write_fake_cifar(tmp_path, n=10)
    _rewrite(folder, 'batches.meta', label_names=CIFAR10_CLASSES[:5])
    with pytest.raises(DatasetError, match=r'labels \(5 class names\) must be in 0\.\.4'): get_dataset('cifar10', tmp_path)
    with pytest.raises(ValueError, match='3 class names'): ImageSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), list('abc'))


def test_imagefolder_val_by_name_and_bad_images(tmp_path):
    root = write_fake_imagefolder(tmp_path/'f', n_per_class=1, classes=('ant', 'bee', 'cat'), size=16)
    (root/'val'/'ant'/'ant_0.JPEG').unlink(); (root/'val'/'ant').rmdir()
    val = get_imagefolder(root, train=False)
    assert val.classes == ['ant', 'bee', 'cat'] and [y for _, y in val.samples] == [1, 2]   # by name, not by position
    (root/'val'/'cow').mkdir(); (root/'val'/'cow'/'c.JPEG').write_bytes((root/'val'/'bee'/'bee_0.JPEG').read_bytes())
    with pytest.raises(DatasetError, match='classes that train/ does not have: cow'): get_imagefolder(root, train=False)
    (root/'val'/'cow'/'c.JPEG').unlink(); (root/'val'/'cow').rmdir()
    bad = root/'train'/'bee'/'bee_0.JPEG'; bad.write_bytes(b'not an image')
    L = get_loaders('imagenet', data_dir=root, batch_size=3, device='cpu', num_workers=0)
    with pytest.raises(DatasetError) as e: list(L.train)
    assert str(bad) in str(e.value) and '\n' not in str(e.value)
    L = get_loaders('imagenet', data_dir=root, batch_size=3, device='cpu', num_workers=1)   # from a worker: still one line naming it
    with pytest.raises(DatasetError) as e: list(L.train)
    assert str(bad) in str(e.value) and '\n' not in str(e.value)


# --- the registry ---

def test_registry_entries():
    assert list_datasets() == ['cifar10', 'cifar100', 'cifar100c', 'cifar10_1', 'cifar10c', 'digits', 'digits8', 'imagenet', 'svhn']
    assert get_dataset_info('cifar100').mean == CIFAR_MEAN and get_dataset_info('cifar100').std == CIFAR_STD   # the seed's, as before
    assert get_dataset_info('cifar10_1').splits == ('test',) and get_dataset_info('cifar10_1').classes == tuple(CIFAR10_CLASSES)
    with pytest.raises(ValueError, match='did you mean svhn'): get_dataset_info('svnh')
    with pytest.raises(ValueError, match='already registered'): register_dataset('svhn', get_dataset_info('svhn').reader, list('0123456789'))


def test_register_a_new_set(tmp_path):
    def read(root, split, download): return ImageSet(torch.full((6, 3, 32, 32), 7, dtype=torch.uint8), torch.arange(6) % 3, ['x', 'y', 'z'])
    read.__module__ = 'my_sets'
    try:
        register_dataset('tri', read, ['x', 'y', 'z'], mean=(0.1,) * 3, std=(0.2,) * 3)
        L = get_loaders('tri', batch_size=2, device='cpu')
        assert (L.num_classes, len(L.train), L.train.batch_tfm.flip) == (3, 3, True)
        assert torch.equal(L.test.mean, torch.tensor((0.1,) * 3))
    finally: DATASETS.pop('tri', None); NORMS.pop('tri', None)


def test_svhn_real_format_matches_torchvision(tmp_path):
    from scipy.io import loadmat
    from torchvision.datasets import SVHN
    folder = write_fake_svhn(tmp_path, n=30, seed=2)
    m = loadmat(str(folder/'train_32x32.mat'))
    assert m['X'].shape == (32, 32, 3, 30) and m['X'].dtype == np.uint8 and m['y'].shape == (30, 1) and set(m['y'].ravel()) == set(range(1, 11))
    assert (folder/'train_32x32.mat').read_bytes()[:10] == b'MATLAB 5.0'
    class Unchecked(SVHN): _check_integrity = lambda self: True   # the fake files do not have the real MD5
    for split in ('train', 'test'):
        mine, tv = get_dataset('svhn', tmp_path, split=split), Unchecked(str(folder), split=split)
        assert np.array_equal(mine.images.numpy(), tv.data) and mine.labels.tolist() == tv.labels.tolist()
        assert 0 in mine.labels.tolist() and 10 not in mine.labels.tolist()
    with pytest.raises(FileNotFoundError, match='--download'): get_dataset('svhn', tmp_path/'none')


def test_cifar10_1_real_format(tmp_path):
    folder = write_fake_cifar10_1(tmp_path, n=25)
    x, y = np.load(folder/'cifar10.1_v6_data.npy'), np.load(folder/'cifar10.1_v6_labels.npy')
    assert x.shape == (25, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (25,)
    ds = get_dataset('cifar10_1', tmp_path, train=False)
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), x) and ds.labels.tolist() == y.tolist()
    with pytest.raises(ValueError, match='test set only'): get_dataset('cifar10_1', tmp_path)
    with pytest.raises(ValueError, match='test set only'): get_loaders('cifar10_1', data_dir=tmp_path)
    np.save(folder/'cifar10.1_v6_labels.npy', np.array([object()] * 25))   # a pickled .npy is never loaded
    with pytest.raises(DatasetError, match='cannot read'): get_dataset('cifar10_1', tmp_path, train=False)


def test_eval_cifar10_model_on_cifar10_1_from_the_command_line(tmp_path):
    from cifar_kit.config import config_from
    from cifar_kit.train import train
    write_fake_cifar(tmp_path/'data', n=8); write_fake_cifar10_1(tmp_path/'data', n=24)
    train(config_from(arch='resnet20', dataset='cifar10', data_dir=str(tmp_path/'data'), epochs=1, limit_batches=1, batch_size=8,
                      device='cpu', progress='off', run_dir=str(tmp_path/'run')))
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'eval', '--checkpoint', str(tmp_path/'run'/'last.pt'), '--dataset', 'cifar10_1',
                        '--data-dir', str(tmp_path/'data'), '--device', 'cpu'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'top-1' in r.stdout, r.stderr
    from cifar_kit.train import evaluate_checkpoint
    res = evaluate_checkpoint(tmp_path/'run'/'last.pt', 'cifar10_1', str(tmp_path/'data'), device='cpu')
    assert 0 <= res['top1_pct'] <= 100 and f"top-1 {res['top1_pct']:.2f}%" in r.stdout
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'eval', '--checkpoint', str(tmp_path/'run'/'last.pt'), '--dataset', 'svhn',
                        '--data-dir', str(tmp_path/'data'), '--device', 'cpu'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'cannot be evaluated on svhn' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_of_an_imagefolder_model_with_two_classes(tmp_path):
    from cifar_kit.config import config_from
    from cifar_kit.train import train, evaluate_checkpoint
    root = write_fake_imagefolder(tmp_path/'in', n_per_class=2, classes=('a', 'b'), size=40)
    train(config_from(arch='resnet18', dataset='imagenet', data_dir=str(root), epochs=1, limit_batches=1, batch_size=4, eval_batch_size=4,
                      device='cpu', progress='off', run_dir=str(tmp_path/'run'), num_workers=0))
    res = evaluate_checkpoint(tmp_path/'run'/'last.pt', None, str(root), device='cpu', batch_size=4)
    assert 0 <= res['top1_pct'] <= 100


def test_eval_suite_and_record_from_the_command_line(tmp_path):
    "`cifar-kit eval CHECKPOINT --suite cifar10c --out-dir`: per corruption and severity, their mean, the clean error, the record"
    import json
    from cifar_kit.config import config_from
    from cifar_kit.train import train, evaluate_checkpoint
    from cifar_kit.data.more_readers import write_fake_cifar_c
    data = tmp_path/'data'
    write_fake_cifar(data, n=8); write_fake_cifar_c(data, n=6, corruptions=('fog', 'brightness'))
    train(config_from(arch='resnet20', dataset='cifar10', data_dir=str(data), epochs=1, limit_batches=1, batch_size=8,
                      device='cpu', progress='off', run_dir=str(tmp_path/'run')))
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'eval', str(tmp_path/'run'/'last.pt'), '--suite', 'cifar10c',
                        '--data-dir', str(data), '--device', 'cpu', '--out-dir', str(tmp_path/'eval')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'mean error' in r.stdout and 'clean' in r.stdout, r.stderr
    rec = json.loads((tmp_path/'eval'/'eval.json').read_text())
    assert set(rec['err_pct']) == {'fog', 'brightness'} and all(len(v) == 5 for v in rec['err_pct'].values())
    errs = [e for v in rec['err_pct'].values() for e in v]
    assert rec['mean_err_pct'] == pytest.approx(sum(errs) / len(errs)) and rec['clean_err_pct'] is not None
    r = subprocess.run([sys.executable, '-m', 'cifar_kit', 'eval', str(tmp_path/'run'/'last.pt'), '--device', 'cpu', '--data-dir', str(data),
                        '--out-dir', str(tmp_path/'clean')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'ECE' in r.stdout, r.stderr
    rec = json.loads((tmp_path/'clean'/'eval.json').read_text())
    assert sum(map(sum, rec['confusion'])) == rec['n'] == 8 and len(rec['per_class_top1_pct']) == 10
    assert {'confusion.png', 'reliability.png'} <= {p.name for p in (tmp_path/'clean').iterdir()}
    assert evaluate_checkpoint(tmp_path/'run'/'last.pt', data_dir=str(data), device='cpu')['confusion'] == rec['confusion']
