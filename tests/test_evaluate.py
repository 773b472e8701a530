"""The eval record against hand counts, its numbers against each other on the digits, the robustness suites on files in
the real layout, and CIFAR-100's superclasses read from pickles written as the real ones are."""
import json, math, pickle, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
import cifar_kit
from cifar_kit.data.readers import CIFAR100_COARSE, CIFAR100_SUPERCLASSES, load_digits, write_fake_cifar
from cifar_kit.data.more_readers import CIFAR_C_CORRUPTIONS, corruption_files, write_fake_cifar10_1, write_fake_cifar_c
from cifar_kit.data.registry import DatasetError, get_dataset, get_dataset_info, DIGITS_MEAN, DIGITS_STD
from cifar_kit.data.feeders import normalize
from cifar_kit.evaluate import ece_from_bins, eval_summary, evaluate_model, evaluate_suite, write_eval_record
from cifar_kit.loaders import test_feeder

ROOT = Path(cifar_kit.__file__).parent.parent


def naive_ece(p:np.ndarray, y:np.ndarray, n_bins:int=15)->float:
    "Guo et al.'s ECE (%), image by image: bins [b/M, (b+1)/M) of the top probability"
    conf, pred, n, ece = p.max(1), p.argmax(1), len(y), 0.
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inb = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= 1))
        if inb.any(): ece += inb.sum() / n * abs((pred[inb] == y[inb]).mean() - conf[inb].mean())
    return 100 * ece


def close(a, b, rel=1e-5): return math.isclose(a, b, rel_tol=rel, abs_tol=rel * max(1., abs(b)))


# --- six images, counted by hand ---

P = np.array([[.90, .05, .05], [.62, .28, .10], [.20, .70, .10], [.10, .05, .85], [.25, .50, .25], [.05, .10, .85]])
Y = np.array([0, 1, 1, 2, 2, 0])


def test_hand_computed_record(tmp_path):
    x, y = torch.tensor(P, dtype=torch.float32).log(), torch.from_numpy(Y)
    rec = evaluate_model(nn.Identity(), [(x[:2], y[:2]), (x[2:], y[2:])], 3, 'cpu', classes=['a', 'b', 'c'],
                         superclasses={'ab': [0, 1], 'c': [2]})
    assert rec['confusion'] == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]        # rows: true class, columns: predicted
    assert rec['per_class_n'] == [2, 2, 2] and all(close(a, 50.) for a in rec['per_class_top1_pct'])
    assert (rec['top1_pct'], rec['err_pct'], rec['top5_pct'], rec['n']) == (50., 50., None, 6)
    # ECE by hand: gaps .50 .62 .30 .10 (one image each) and .35 (bin 12, two images) -> 2.22 / 6
    assert close(rec['ece_pct'], 37.0) and close(naive_ece(P, Y), 37.0) and close(ece_from_bins(rec['reliability']), 37.0)
    assert rec['reliability']['count'] == [0] * 7 + [1, 0, 1, 1, 0, 2, 1, 0]
    assert close(rec['loss'], -np.log(P[np.arange(6), Y]).mean())
    assert close(rec['superclass_top1_pct'], 100 * 4 / 6) and rec['superclass_confusion'] == [[3, 1], [1, 1]]
    paths = write_eval_record(rec, tmp_path/'out')
    assert [p.name for p in paths] == ['eval.json', 'confusion.png', 'reliability.png']
    back = json.loads((tmp_path/'out'/'eval.json').read_text())
    assert back['confusion'] == rec['confusion'] and back['reliability']['acc_pct'][12] == 50.0 and back['top5_pct'] is None
    assert all(p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for p in paths[1:])
    assert not list((tmp_path/'out').glob('.*.tmp'))                    # the atomic write leaves no temporary file


def test_bad_inputs_are_one_line_errors():
    x, y = torch.tensor(P, dtype=torch.float32).log(), torch.from_numpy(Y)
    with pytest.raises(ValueError, match='gives 3 scores per image but the data set has 10 classes') as e: evaluate_model(nn.Identity(), [(x, y)], 10, 'cpu')
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='exactly once'): evaluate_model(nn.Identity(), [(x, y)], 3, 'cpu', superclasses={'a': [0, 1]})
    with pytest.raises(ValueError, match='no images'): evaluate_model(nn.Identity(), [], 3, 'cpu')


# --- the digits: the numbers agree with each other and with a plain recomputation ---

@pytest.fixture(scope='module')
def digits_model():
    torch.manual_seed(0)
    tr = load_digits()
    x = normalize(tr.images, DIGITS_MEAN, DIGITS_STD)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(40): opt.zero_grad(); F.cross_entropy(net(x), tr.labels).backward(); opt.step()
    return net


def test_digits_record_is_consistent(digits_model, tmp_path):
    feeder, names = test_feeder('digits', batch_size=64, device='cpu')
    net = digits_model.train()
    r = evaluate_model(net, feeder, 10, 'cpu', classes=names)
    assert net.training                                                  # its mode is given back
    te = load_digits(train=False)
    with torch.no_grad(): logits = net(normalize(te.images, DIGITS_MEAN, DIGITS_STD))
    p, y = logits.softmax(1).numpy().astype(np.float64), te.labels.numpy()
    cm = np.array(r['confusion'])
    assert cm.sum() == r['n'] == 360 and cm.sum(1).tolist() == np.bincount(y).tolist() == r['per_class_n']
    assert close(r['top1_pct'], 100 * np.trace(cm) / 360) and close(r['top1_pct'], 100 * (p.argmax(1) == y).mean())
    assert np.allclose(r['per_class_top1_pct'], 100 * cm.diagonal() / cm.sum(1), rtol=1e-5)
    assert close(r['top5_pct'], 100 * np.mean([y[i] in np.argsort(-p[i])[:5] for i in range(360)]))
    assert close(r['loss'], F.cross_entropy(logits, te.labels).item(), 1e-4)
    assert close(r['ece_pct'], naive_ece(p, y), 1e-3) and close(ece_from_bins(r['reliability']), r['ece_pct'], 1e-3)
    assert sum(r['reliability']['count']) == 360 and r['top1_pct'] > 80 and r['top5_pct'] >= r['top1_pct']
    rt = evaluate_model(net, feeder, 10, 'cpu', tta=True)
    with torch.no_grad(): pt = (logits.softmax(1) + net(normalize(te.images, DIGITS_MEAN, DIGITS_STD).flip(3)).softmax(1)) / 2
    assert rt['tta'] and close(rt['top1_pct'], 100 * (pt.argmax(1).numpy() == y).mean())
    assert close(rt['loss'], -pt[torch.arange(360), te.labels].log().mean().item(), 1e-4)
    assert 'top-1' in eval_summary(r) and eval_summary(rt).endswith('(flip TTA)')
    assert [p.name for p in write_eval_record(r, tmp_path)] == ['eval.json', 'confusion.png', 'reliability.png']


# --- robustness suites, on files in the real layout ---

class FirstPixels(nn.Module):
    "Class k's logit: the red value of pixel (0, k) of the image, ties to the larger k"
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(()))   # a parameter: the device comes from it
    def forward(self, x): return x[:, 0, 0, :10] + 1e-3 * torch.arange(10., device=x.device) + self.w


def rule(raw:np.ndarray)->np.ndarray:
    "FirstPixels on N×32×32×3 uint8 pixels"
    return (raw[:, 0, :10, 0].astype(np.int64) * 100 + np.arange(10)).argmax(1)


def test_cifar10c_reader_real_layout(tmp_path):
    folder = write_fake_cifar_c(tmp_path, n=7, corruptions=('fog', 'pixelate'))   # blocks of any equal size
    assert np.load(folder/'fog.npy').shape == (35, 32, 32, 3) and np.load(folder/'labels.npy').dtype == np.uint8
    parts = corruption_files('cifar10c', tmp_path)
    blocks = parts['pixelate']()
    raw, labels = np.load(folder/'pixelate.npy'), np.load(folder/'labels.npy')
    for s, b in enumerate(blocks):
        assert torch.equal(b.images, torch.from_numpy(raw[7*s:7*(s+1)]).permute(0, 3, 1, 2)) and b.labels.tolist() == labels[7*s:7*(s+1)].tolist()
    assert len(get_dataset('cifar10c', tmp_path, split='test')) == 70
    np.save(folder/'labels.npy', np.zeros(30, np.uint8))
    with pytest.raises(DatasetError, match='N = the 30 labels'): corruption_files('cifar10c', tmp_path)
    np.save(folder/'labels.npy', np.full(35, 10, np.uint8))
    with pytest.raises(DatasetError, match='labels must be in 0..9'): corruption_files('cifar10c', tmp_path)
    np.save(folder/'labels.npy', labels)
    (folder/'fog.npy').write_bytes(pickle.dumps(np.zeros(3)))          # a pickle, not a .npy: refused, never unpickled
    with pytest.raises(DatasetError, match='fog.npy'): corruption_files('cifar10c', tmp_path)


def test_cifar10c_suite_against_the_files(tmp_path):
    folder = write_fake_cifar_c(tmp_path, n=9, corruptions=('gaussian_noise', 'snow', 'spatter'), seed=3)
    labels = np.load(folder/'labels.npy')
    want = {c: [100 * (rule(x[9*s:9*(s+1)]) != labels[9*s:9*(s+1)]).mean() for s in range(5)]
            for c in ('gaussian_noise', 'snow', 'spatter') for x in [np.load(folder/f'{c}.npy')]}
    r = evaluate_suite(FirstPixels(), 'cifar10c', tmp_path, batch_size=4)
    assert list(r['err_pct']) == ['gaussian_noise', 'snow', 'spatter']
    assert all(np.allclose(r['err_pct'][c], want[c]) for c in want)
    assert close(r['mean_err_pct'], np.mean(want['gaussian_noise'] + want['snow']))     # spatter is not one of RobustBench's 15
    assert r['mean_over'] == ['gaussian_noise', 'snow'] and len(r['missing']) == 13 and 'spatter' in r['corruption_err_pct']
    assert np.allclose(r['severity_err_pct'], [(want['gaussian_noise'][s] + want['snow'][s]) / 2 for s in range(5)])
    assert r['clean_err_pct'] is None and r['gap_pct'] is None and 'cifar10 not found' in r['clean_note']
    write_fake_cifar(tmp_path, n=25)
    with open(tmp_path/'cifar-10-batches-py'/'test_batch', 'rb') as f: tb = pickle.load(f, encoding='latin1')
    clean = 100 * (rule(tb['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) != np.array(tb['labels'])).mean()
    r = evaluate_suite(FirstPixels(), 'cifar10c', tmp_path, 'cpu', norm='cifar10', tta=False)
    assert close(r['clean_err_pct'], clean) and close(r['gap_pct'], r['mean_err_pct'] - clean) and r['norm'] == 'cifar10'
    paths = write_eval_record(r, tmp_path/'rec')
    assert [p.name for p in paths] == ['eval.json', 'corruptions.png']
    assert json.loads(paths[0].read_text())['err_pct']['snow'] == r['err_pct']['snow']


def test_cifar10_1_suite_and_errors(tmp_path):
    folder = write_fake_cifar10_1(tmp_path, n=30)
    want = 100 * (rule(np.load(folder/'cifar10.1_v6_data.npy')) != np.load(folder/'cifar10.1_v6_labels.npy')).mean()
    r = evaluate_suite(FirstPixels(), 'cifar10_1', tmp_path, 'cpu')
    assert (r['n'], r['clean']) == (30, 'cifar10') and close(r['mean_err_pct'], want) and r['clean_err_pct'] is None
    with pytest.raises(ValueError, match="unknown suite 'cifar10'"): evaluate_suite(FirstPixels(), 'cifar10', tmp_path, 'cpu')
    with pytest.raises(FileNotFoundError, match='CIFAR-10-C.tar from https://zenodo.org/record/2535967'):
        evaluate_suite(FirstPixels(), 'cifar10c', tmp_path, 'cpu')
    assert set(CIFAR_C_CORRUPTIONS) >= {'fog', 'snow', 'jpeg_compression'} and len(CIFAR_C_CORRUPTIONS) == 15


# --- CIFAR-100's superclasses ---

def test_cifar100_coarse_labels_and_superclass_accuracy(tmp_path):
    folder = write_fake_cifar(tmp_path, n=60, num_classes=100)
    with open(folder/'test', 'rb') as f: raw = pickle.load(f, encoding='latin1')
    with open(folder/'meta', 'rb') as f: meta = pickle.load(f, encoding='latin1')
    assert raw['coarse_labels'] == [CIFAR100_COARSE[i] for i in raw['fine_labels']] and meta['coarse_label_names'] == CIFAR100_SUPERCLASSES
    te = get_dataset('cifar100', tmp_path, train=False)
    assert te.coarse.tolist() == raw['coarse_labels'] and te.coarse_classes == CIFAR100_SUPERCLASSES
    tr, va = get_dataset('cifar100', tmp_path).split(50, seed=0)
    assert va.coarse.tolist() == [CIFAR100_COARSE[i] for i in va.labels.tolist()] and len(tr.coarse) == 250
    sup = get_dataset_info('cifar100').superclasses
    assert list(sup) == CIFAR100_SUPERCLASSES and all(CIFAR100_COARSE[i] == s for s, fine in enumerate(sup.values()) for i in fine)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100))
    feeder, names = test_feeder('cifar100', tmp_path, 16, 'cpu')
    r = evaluate_model(net, feeder, 100, 'cpu', superclasses=sup, classes=names)
    info = get_dataset_info('cifar100')
    with torch.no_grad(): pred = net(normalize(te.images, info.mean, info.std)).argmax(1)
    want = 100 * np.mean([CIFAR100_COARSE[p] == c for p, c in zip(pred.tolist(), te.coarse.tolist())])   # the file's coarse labels
    assert close(r['superclass_top1_pct'], want) and len(r['superclass_per_class_top1_pct']) == 20
    assert r['superclass_top1_pct'] >= r['top1_pct']


def test_importing_evaluate_loads_neither_matplotlib_nor_torchmetrics():
    code = 'import cifar_kit.evaluate, sys; print(sorted(m for m in ("matplotlib", "torchmetrics") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == '[]'


def test_update_reads_nothing_back_from_the_device(monkeypatch):
    "Each batch only launches kernels: any read of a tensor's value during the updates fails the test"
    from cifar_kit.evaluate import EvalSums
    from cifar_kit.learner import eval_sums
    sums = EvalSums(10, 'cpu')
    torch.manual_seed(0)
    batches = [(torch.randn(8, 10), torch.randint(0, 10, (8,))) for _ in range(3)]
    def refuse(*a, **k): raise AssertionError('a tensor was read back during an update')
    tm_ce = sys.modules['torchmetrics.functional.classification.calibration_error']   # the module (its package exports a function of that name)
    def device_path(t, normalization):   # torchmetrics' own GPU branch: on the CPU it checks its input with a read, free there
        return torch.where(((t < 0) | (t > 1)).any(), t.softmax(1), t)
    monkeypatch.setattr(tm_ce, 'normalize_logits_if_needed', device_path)
    with monkeypatch.context() as m:
        for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__', '__index__'): m.setattr(torch.Tensor, name, refuse)
        eval_sums(nn.Identity(), batches, sums, loss_func=None)   # the whole pass: scores, loss, sums
    rec = sums.compute()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert rec['n'] == 24 and close(rec['top1_pct'], 100 * (x.argmax(1) == y).float().mean().item())
