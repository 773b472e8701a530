"""What the trust tests share: the tiny run they train, a snapshot of a folder's bytes (to show that a refusal changed
nothing), and `copy_run` for the finished run of the `done_run` fixture (in conftest.py), which each test copies
rather than changes."""
import shutil
from pathlib import Path

# one batch of resnet20 on the digits, deterministic: a run of seconds
TINY = dict(recipe='resnet20-digits', limit_batches=1, deterministic=True, progress='off', eval_batch_size=512, device='cpu')


def snapshot(d:Path)->dict:
    "Every regular file under `d` (through links to files) and its bytes"
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob('*')) if p.is_file()}


def copy_run(src:Path, dst:Path)->Path:
    shutil.copytree(src, dst); return dst
