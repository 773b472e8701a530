"""The divergence guard under DDP, on 2 gloo processes: each check starts its all-reduce without waiting and the ranks
decide together one check later, so a NaN on one rank stops both at the same step with the same message.

The ranks are forked from the test process, which has imported everything already: a rank costs a fork, not an
import of torch. A forked rank runs on one thread: the parent's OpenMP pool does not survive the fork."""
import json, multiprocessing
from pathlib import Path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from cifar_kit.learner import Learner, Callback
from cifar_kit.callbacks import NaNGuardCB
CHECK_EVERY, POISON_RANK, POISON_STEP = 2, 1, 3   # a NaN on rank 1 at batch index 3 of the first epoch


def worker(rank:int, world:int, init_file:str, out:str):
    torch.set_num_threads(1)   # the parent's OpenMP pool does not survive a fork: one thread never enters it
    class PoisonAt(Callback):
        order = -10
        def after_loss(self):
            if (self.learn.rank, self.learn.epoch, self.learn.iter) == (POISON_RANK, 0, POISON_STEP):
                self.learn.loss = self.learn.loss * float('nan')

    class StopAt(Callback):
        def after_cancel_fit(self): self.learn.stopped_at = self.learn.iter

    calls = []   # this process's all-reduces: `async_op` of each
    def recording_all_reduce(t, *args, async_op=False, **kw):
        calls.append(async_op)
        return real_all_reduce(t, *args, async_op=async_op, **kw)
    real_all_reduce, dist.all_reduce = dist.all_reduce, recording_all_reduce

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(4, 3, generator=g), torch.randint(2, (4,), generator=g)) for _ in range(10)]
        learn = Learner(nn.Linear(3, 2), batches, loss_func=F.cross_entropy, rank=rank, world_size=world,
                        cbs=[NaNGuardCB(check_every=CHECK_EVERY), PoisonAt(), StopAt()])
        learn.fit(2)
        Path(out).write_text(json.dumps({'diverged': getattr(learn, 'diverged', None), 'calls': calls,
                                         'stopped_at': getattr(learn, 'stopped_at', None)}))
    finally: dist.destroy_process_group()


def test_ranks_stop_together_one_check_later(tmp_path):
    fork = multiprocessing.get_context('fork')
    outs = [tmp_path/f'rank{r}.json' for r in range(2)]
    procs = [fork.Process(target=worker, args=(r, 2, str(tmp_path/'init'), str(outs[r]))) for r in range(2)]
    for p in procs: p.start()
    try:
        for p in procs: p.join(timeout=600)   # a guard against a wedged rank, never a speed limit
    finally:
        for p in procs:
            if p.is_alive(): p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    got = [json.loads(o.read_text()) for o in outs]
    assert got[0] == got[1], got                                       # the same decision, at the same step
    assert got[0]['diverged'] == {'epoch': 1, 'step': POISON_STEP + 1, 'message': got[0]['diverged']['message']}
    # the check at index 3 starts the all-reduce that sees the NaN; the check at index 5 reads it and stops both
    assert got[0]['stopped_at'] == POISON_STEP + CHECK_EVERY
    assert got[0]['calls'] == [True] * 3                               # checks at 1, 3, 5: every one asynchronous
