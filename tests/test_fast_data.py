"""airbench's data side in the device feeder: alternating flips (each image the other way every epoch, by its index,
exact on resume), reflection padding (equal to a naive per-image F.pad + crop), and defaults that leave the seed's
stream bit for bit as it was."""
import dataclasses
import pytest
import torch
import torch.nn.functional as F
from cifar_kit.config import config_from
from cifar_kit.cli import command_parser
from cifar_kit.data.augment import CropFlip, ReflectCropFlip, random_crop_flip
from cifar_kit.data.feeders import DeviceLoader, first_flips, normalize
from cifar_kit.data.readers import write_fake_cifar
from cifar_kit.data.registry import get_dataset, get_norm
from cifar_kit.learner import DispatchCounter
from cifar_kit.loaders import get_loaders
from cifar_kit.models.airbench import alternating_flips
from cli_helpers import one_line_error

N = 1437   # the digits' training images


def digits_indexed(**fields):
    "The digits' training feeder with `fields`, its labels replaced by the images' indices (so a batch names its images)"
    L = get_loaders('digits', device='cpu', batch_size=200, **fields)
    L.train.labels = torch.arange(len(L.train.images))
    return L.train


def mirrored(feeder, epochs):
    "Per epoch (rows), whether each image (columns) came out mirrored; images equal to their mirror are -1"
    mean, std = get_norm('digits')
    out = torch.full((len(epochs), len(feeder.images)), -1)
    for k, e in enumerate(epochs):
        feeder.set_epoch(e)
        for x, i in feeder:
            img = feeder.images[i]
            same = (x == normalize(img, mean, std)).flatten(1).all(1)
            flip = (x == normalize(img.flip(-1), mean, std)).flatten(1).all(1)
            assert (same | flip).all()   # pad 0: the crop is the image itself, so only the flip can act
            out[k, i] = torch.where(same & flip, -1, flip.long())
    return out


def test_alternate_flips_each_image_on_every_other_epoch_through_the_real_feeder():
    f = mirrored(digits_indexed(flip='alternate', pad=0, seed=3), range(5))
    seen = f[0] >= 0                               # digits that differ from their mirror: nearly all of them
    assert seen.sum() > 0.95 * N and (f >= 0).eq(seen).all()
    assert (f[1:, seen] != f[:-1, seen]).all()     # every image, every epoch: the other way from the epoch before
    assert torch.equal(f[0, seen].bool(), first_flips(N, 3)[seen])   # epoch 0: the seed's coins, by index
    assert 0.45 < f[0, seen].float().mean() < 0.55
    # the rule of the airbench lesson (models/airbench), with the feeder's coins as its first epoch
    assert torch.equal(f[:, seen].bool(), torch.stack([first_flips(N, 3)[seen] ^ bool(e % 2) for e in range(5)]))
    again = alternating_flips(torch.arange(N), N, 4, seed=3) ^ alternating_flips(torch.arange(N), N, 0, seed=3)
    assert not again.any()                         # both rules: even epochs repeat the first


def test_alternate_flips_are_a_function_of_seed_epoch_and_index_so_a_resume_is_exact():
    full = digits_indexed(flip='alternate', pad=2, pad_mode='reflect', seed=5)
    batches = {e: [(x, y) for x, y in full] for e in range(4)}            # epochs 0..3 in one go
    resumed = digits_indexed(flip='alternate', pad=2, pad_mode='reflect', seed=5)
    resumed.set_epoch(3)                                                   # a run resumed at epoch 3
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches[3], resumed))
    other = mirrored(digits_indexed(flip='alternate', pad=0, seed=6), [0])
    assert not torch.equal(other[0], mirrored(digits_indexed(flip='alternate', pad=0, seed=5), [0])[0])


def test_random_flips_draw_a_coin_per_image_and_epoch():
    f = mirrored(digits_indexed(flip='random', pad=0, seed=3), range(2))
    seen = f[0] >= 0
    same_twice = (f[1, seen] == f[0, seen]).float().mean()
    assert 0.45 < same_twice < 0.55                 # about half the images repeat their flip, unlike alternate's none
    assert (mirrored(digits_indexed(pad=0, seed=3), [0]) <= 0).all()   # digits by default: never flipped


def naive_reflect_windows(img, pad):
    "Every window a ±pad shift can cut from `img` padded by F.pad(mode='reflect'), one per offset"
    h, w = img.shape[-2:]
    p = F.pad(img[None].float(), (pad,) * 4, mode='reflect')[0]
    return torch.stack([p[:, t:t + h, l:l + w] for t in range(2 * pad + 1) for l in range(2 * pad + 1)])


def test_reflect_padding_equals_a_naive_per_image_pad_and_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8, generator=g)
    for pad in (1, 2, 6):
        offsets, flips = torch.randint(0, 2 * pad + 1, (40, 2), generator=g), torch.rand(40, generator=g) < 0.5
        got = random_crop_flip(x, pad, offsets=offsets, flips=flips, pad_mode='reflect')
        for img, (t, l), f, out in zip(x, offsets.tolist(), flips.tolist(), got):
            want = F.pad(img[None].float(), (pad,) * 4, mode='reflect')[0, :, t:t + 9, l:l + 7]
            assert torch.equal(out.float(), want.flip(-1) if f else want)


def test_reflect_crop_through_the_real_feeder_cuts_windows_of_the_reflected_image():
    feeder = digits_indexed(pad=2, pad_mode='reflect', seed=1)
    assert feeder.batch_tfm == ReflectCropFlip(2, flip=False)
    mean, std = get_norm('digits')
    hits = torch.zeros(25, dtype=torch.long)
    for x, i in feeder:
        raw = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
        for out, img in zip(raw.round(), feeder.images[i]):
            match = (naive_reflect_windows(img, 2) == out).flatten(1).all(1)
            assert match.any()          # one of the 25 windows of the reflected image: no black border anywhere
            hits += match
    assert (hits > 0).all()             # and every offset of -2..2 by -2..2 occurs


def old_random_crop_flip(x, pad=4, generator=None, flip=True):
    "The device feeder's crop as it was before reflection padding existed (the seed's stream), kept as the oracle"
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=x.device)
    flips = (torch.rand(n, generator=generator, device=x.device) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    wp = w + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad)).reshape(n, c, -1)
    rows = offsets[:, :1] + torch.arange(h)
    cols = offsets[:, 1:] + torch.arange(w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    return xp.gather(2, flat.expand(n, c, h * w)).reshape(n, c, h, w)


@pytest.mark.parametrize('dataset', ['digits', 'cifar10'])
def test_defaults_leave_the_seed_stream_bit_identical(dataset, tmp_path):
    data_dir = tmp_path if dataset == 'cifar10' else None
    if data_dir: write_fake_cifar(tmp_path, n=64)
    L = get_loaders(dataset, device='cpu', batch_size=32, seed=7, data_dir=data_dir)
    ds, mean, std = get_dataset(dataset, data_dir), *get_norm('digits' if dataset == 'digits' else 'seed_cifar')
    flips = dataset == 'cifar10'
    old = DeviceLoader(ds.images, ds.labels, 32, shuffle=True, device='cpu', mean=mean, std=std, seed=7,
                       batch_tfm=lambda x, g: old_random_crop_flip(x, 4, g, flip=flips))
    named = get_loaders(dataset, device='cpu', batch_size=32, seed=7, data_dir=data_dir,
                        flip='random' if flips else 'off', pad=4, pad_mode='zeros').train   # the same, said out loud
    for e in (0, 1):
        for feeder in (L.train, old, named): feeder.set_epoch(e)
        for (a, y), (b, z), (c, w) in zip(L.train, old, named, strict=True):
            assert torch.equal(a, b) and torch.equal(y, z) and torch.equal(a, c) and torch.equal(y, w)
    assert L.train.coins is None and L.train.batch_tfm == CropFlip(4, flip=flips)


def test_an_alternating_reflecting_epoch_reads_nothing_back_from_the_device():
    feeder = get_loaders('digits', device='cpu', batch_size=128, flip='alternate', pad=2, pad_mode='reflect').train
    for e in (0, 1):
        feeder.set_epoch(e); next(iter(feeder))   # first calls: caches, lazy imports
        with DispatchCounter() as c:
            feeder.set_epoch(e)
            n = sum(len(y) for _, y in feeder)
        assert n == N and (c.reads, c.from_python, c.data_dependent) == (0, 0, 0), c.ops


def test_the_settings_are_flags_checked_before_any_work(capsys, tmp_path):
    a = command_parser('train').parse_args(['--recipe', 'resnet20-digits', '--flip', 'alternate', '--pad', '2',
                                            '--pad-mode', 'reflect'])
    assert (a.flip, a.pad, a.pad_mode) == ('alternate', 2, 'reflect')
    c = config_from('resnet20-digits', flip='alternate', pad=2, pad_mode='reflect')
    assert (c.flip, c.pad, c.pad_mode) == ('alternate', 2, 'reflect')
    assert dataclasses.replace(c, flip='auto', pad=None, pad_mode='zeros') == config_from('resnet20-digits')
    with pytest.raises(ValueError, match=r"^flip must be one of .*got 'sideways'$"):
        config_from('resnet20-digits', flip='sideways')
    with pytest.raises(ValueError, match=r"^pad_mode must be one of .*got 'edge'$"):
        config_from('resnet20-digits', pad_mode='edge')
    with pytest.raises(ValueError, match='--pad must be a number of pixels >= 0'):
        get_loaders(config_from('resnet20-digits', pad=-1), device='cpu')
    with pytest.raises(ValueError, match='use --feeder device'):
        get_loaders(config_from('resnet20-digits', flip='alternate', feeder='torch'), device='cpu')
    one_line_error(capsys, 'train', '--recipe', 'resnet20-digits', '--pad-mode', 'edge', '--out-dir', tmp_path / 'r',
                   contains='edge')
