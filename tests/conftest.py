"""Shared pytest set-up: the `slow` marker (skipped unless `--runslow`) and `tests/` on sys.path for `seed_reference`."""
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
