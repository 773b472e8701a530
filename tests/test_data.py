"""Package-level tests of cifar_kit.data (registry, readers, feeders, augment): readers, feeders, augmentation, errors."""
import pickle
import numpy as np
import pytest
import torch
import cifar_kit  # noqa: F401  (installs the torchvision shim before torchvision is imported)
import torchvision.transforms.v2.functional as TF
from cifar_kit.data.registry import DatasetError, ImageSet, get_dataset
from cifar_kit.data.readers import write_fake_cifar, read_cifar, get_imagefolder, write_fake_imagefolder, CIFAR10_CLASSES, CIFAR100_CLASSES
from cifar_kit.data.feeders import DeviceLoader, TorchLoader
from cifar_kit.data.augment import random_crop_flip, CropFlip, seed_train_transform
from cifar_kit.loaders import get_loaders


def _raw(path):
    with open(path, 'rb') as f: return pickle.load(f, encoding='latin1')   # the kit's own files: trusted here

# --- CIFAR files through the real reader ---

def test_fake_cifar10_round_trip(tmp_path):
    folder = write_fake_cifar(tmp_path, n=6, seed=1)
    assert folder == tmp_path/'cifar-10-batches-py'
    tr, te = get_dataset('cifar10', tmp_path), get_dataset('cifar10', tmp_path, train=False)
    assert (len(tr), len(te), tr.classes) == (30, 6, CIFAR10_CLASSES)
    raws = [_raw(folder/f'data_batch_{i}') for i in range(1, 6)]
    assert torch.equal(tr.images, torch.from_numpy(np.concatenate([r['data'] for r in raws])).view(30, 3, 32, 32))
    assert tr.labels.tolist() == sum((r['labels'] for r in raws), [])
    assert te.labels.tolist() == _raw(folder/'test_batch')['labels']
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64


def test_fake_cifar100_round_trip(tmp_path):
    folder = write_fake_cifar(tmp_path, n=100, num_classes=100)
    raw, meta = _raw(folder/'train'), _raw(folder/'meta')
    assert set(raw) == {'batch_label', 'data', 'fine_labels', 'coarse_labels', 'filenames'}
    assert len(meta['coarse_label_names']) == 20
    tr = get_dataset('cifar100', tmp_path)
    assert (len(tr), tr.classes) == (500, CIFAR100_CLASSES)
    assert torch.equal(tr.images, torch.from_numpy(raw['data']).view(500, 3, 32, 32))
    assert tr.labels.tolist() == raw['fine_labels']
    assert len(get_dataset('cifar100', tmp_path, train=False)) == 100


def test_data_root_from_env(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, n=2)
    monkeypatch.setenv('CIFAR_KIT_DATA', str(tmp_path))
    assert len(get_dataset('cifar10')) == 10

# --- errors ---

def test_missing_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e: get_dataset('cifar100', tmp_path/'empty')
    msg = str(e.value)
    assert str(tmp_path/'empty'/'cifar-100-python') in msg and '--download' in msg and '\n' not in msg


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean cifar10"): get_dataset('cifar_10')
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"): get_dataset('mnist')


def test_corrupt_batch_file(tmp_path):
    folder = write_fake_cifar(tmp_path, n=4)
    (folder/'data_batch_4').write_bytes(b'not a pickle at all')
    with pytest.raises(DatasetError) as e: get_dataset('cifar10', tmp_path)
    assert 'data_batch_4' in str(e.value) and 'delete' in str(e.value) and '--download' in str(e.value)


def test_missing_batch_file(tmp_path):
    folder = write_fake_cifar(tmp_path, n=4)
    (folder/'test_batch').unlink()
    with pytest.raises(FileNotFoundError, match='test_batch'): get_dataset('cifar10', tmp_path, train=False)


def test_split_errors():
    s = ImageSet(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), torch.arange(5), list('abcde'))
    with pytest.raises(ValueError, match='n_val=5'): s.split(5)
    tr, va = s.split(2, seed=0)
    assert (len(tr), len(va)) == (3, 2) and not set(tr.labels.tolist()) & set(va.labels.tolist())

# --- digits ---

def test_digits_fixed_split():
    tr, te = get_dataset('digits'), get_dataset('digits', train=False)
    assert (len(tr), len(te)) == (1437, 360)
    assert tr.images.shape == (1437, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert te.labels.bincount().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert tr.labels.bincount().tolist() == [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
    assert torch.equal(get_dataset('digits', train=False).images, te.images)
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0

# --- ImageNet-style folders ---

def test_imagefolder(tmp_path):
    root = write_fake_imagefolder(tmp_path, n_per_class=2, classes=('x', 'y', 'z'), size=40)
    assert len(list((root/'train'/'y').glob('*.JPEG'))) == 2
    tr = get_imagefolder(root, transform=TF.to_image)
    assert (len(tr), tr.classes) == (6, ['x', 'y', 'z'])
    img, lbl = tr[3]
    assert img.shape == (3, 40, 40) and lbl == 1
    with pytest.raises(FileNotFoundError, match='train/<class>'): get_imagefolder(tmp_path/'none')

# --- augmentation oracle ---

def test_random_crop_flip_oracle():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    offs, flips = torch.randint(0, 9, (40, 2), generator=g), torch.rand(40, generator=g) < 0.5
    ref = torch.stack([(TF.horizontal_flip if f else (lambda t: t))(TF.crop(TF.pad(im, [4], fill=0), t, l, 32, 32))
                       for im, (t, l), f in zip(x, offs.tolist(), flips.tolist())])
    out = random_crop_flip(x, 4, offsets=offs, flips=flips)
    assert out.dtype == torch.uint8 and torch.equal(out, ref)


def test_per_image_pipeline_shape():
    out = seed_train_transform()(torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32

# --- feeders ---

def _toy(n=1000):
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), torch.arange(n)


def test_device_loader_epoch_determinism():
    x, y = _toy()
    a = DeviceLoader(x, y, 100, shuffle=True, device='cpu', batch_tfm=CropFlip(), seed=3)
    b = DeviceLoader(x, y, 100, shuffle=True, device='cpu', batch_tfm=CropFlip(), seed=3)
    a.set_epoch(5); b.set_epoch(5)
    for (xa, ya), (xb, yb) in zip(a, b): assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seed+epoch
    b.set_epoch(6)
    a.set_epoch(5)
    assert not torch.equal(torch.cat([t for _, t in a]), torch.cat([t for _, t in b]))      # other epoch, other order
    # resuming at epoch 2 gives the same batches as running through epochs 0, 1, 2
    c = DeviceLoader(x, y, 100, shuffle=True, device='cpu', batch_tfm=CropFlip(), seed=3)
    for _ in range(2): list(c)
    d = DeviceLoader(x, y, 100, shuffle=True, device='cpu', batch_tfm=CropFlip(), seed=3); d.set_epoch(2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(c, d))


def test_device_loader_shards_disjoint():
    x, y = _toy(1001)
    ys = []
    for r in (0, 1):
        dl = DeviceLoader(x, y, 64, shuffle=True, device='cpu', rank=r, world_size=2, drop_last=True); dl.set_epoch(1)
        ys.append(torch.cat([t for _, t in dl]).tolist())
        assert dl.dataset_size == 500 and len(dl) == 7
    assert not set(ys[0]) & set(ys[1]) and len(set(ys[0]) | set(ys[1])) == 7 * 64 * 2
    pad = DeviceLoader(x, y, 64, shuffle=True, device='cpu', rank=1, world_size=2)
    assert pad.dataset_size == 501 and len(torch.cat([t for _, t in pad])) == 501


def test_batch_counts():
    x, y = _toy(1000)
    assert len(DeviceLoader(x, y, 128, device='cpu')) == 8
    assert len(DeviceLoader(x, y, 128, device='cpu', drop_last=True)) == 7
    assert [len(t) for _, t in DeviceLoader(x, y, 128, device='cpu')][-1] == 1000 - 7 * 128
    big = torch.zeros(50000, 3, 1, 1, dtype=torch.uint8)
    assert len(DeviceLoader(big, torch.zeros(50000), 128, device='cpu')) == 391
    assert len(DeviceLoader(big, torch.zeros(50000), 128, device='cpu', drop_last=True)) == 390
    s = ImageSet(x, y, [str(i) for i in range(1000)])
    assert len(TorchLoader(s, 128, device='cpu')) == 8 and len(TorchLoader(s, 128, device='cpu', drop_last=True)) == 7


def test_torch_loader_epoch_order():
    x, y = _toy(50)
    s = ImageSet(x, y, [str(i) for i in range(50)])
    tl = TorchLoader(s, 16, shuffle=True, device='cpu', transform=lambda t: t.float())
    tl.set_epoch(2); a = torch.cat([t for _, t in tl])
    tl.set_epoch(2); b = torch.cat([t for _, t in tl])
    c = torch.cat([t for _, t in tl])   # epoch 3
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_get_loaders_digits():
    L = get_loaders('digits', batch_size=64, val_size=137, device='cpu')
    assert (L.train.dataset_size, L.valid.dataset_size, L.test.dataset_size) == (1300, 137, 360)
    assert L.num_classes == 10 and L.classes == list('0123456789')
    x, y = next(iter(L.train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert L.train.batch_tfm.flip is False   # digits are never flipped
