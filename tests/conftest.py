"""Shared pytest set-up: the `slow` marker (skipped unless `--runslow`), `tests/` on sys.path for `seed_reference` and
the helper modules, and `done_run`, a finished tiny run (module scope) that the trust tests copy."""
import sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='also run tests marked slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: heavy test, skipped unless pytest is given --runslow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'): return
    skip = pytest.mark.skip(reason='slow: run with --runslow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)


@pytest.fixture(scope='module')
def done_run(tmp_path_factory):
    "A finished 1-epoch run, never changed by the tests (they copy it)"
    from cifar_kit.train import train
    from run_helpers import TINY
    d = tmp_path_factory.mktemp('done') / 'run'
    train(**TINY, epochs=1, run_dir=str(d))
    return d
