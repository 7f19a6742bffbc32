"""KFACPreconditioner under DistributedDataParallel (gloo, 2 CPU processes): each rank holds half
of every batch, DDP averages .grad in backward and the preconditioner averages its factor
statistics over DDP's process group, so both ranks take the steps of one process on the
concatenated batch (fp64 round-off: the averages are summed in another order). Also with 2
micro-batches per step (``no_sync`` on the first, ``accumulation_steps=2``): 4 blocks of 8
examples per step, IFANG's rank-3 row groups straddling ranks and micro-batches."""
import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.optim.test_kfac_preconditioner import METHODS, SETTINGS, _data, _net

STEPS = 4
WORLD = 2
BATCH = 32
RUNS = [(m, k) for m in METHODS for k in (1, 2)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(method, micro, rank=0, world=1):
    """STEPS steps of SGD(momentum 0.9) on KFACPreconditioner; this rank's share of each batch in
    ``micro`` micro-batches. Returns the model's parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from natasha_ext.optim import KFACPreconditioner

    model = _net(bn=False)
    net = DDP(model) if world > 1 else model
    pc = KFACPreconditioner(net, method, accumulation_steps=micro, **SETTINGS[method])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    per = BATCH // (world * micro)
    for i in range(STEPS):
        x, y = _data(i, n=BATCH)
        opt.zero_grad()
        for j in range(micro):
            lo = (rank * micro + j) * per
            ctx = net.no_sync() if world > 1 and j < micro - 1 else torch.enable_grad()
            with ctx:
                (F.cross_entropy(net(x[lo:lo + per]), y[lo:lo + per]) / micro).backward()
        assert pc.step()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for method, micro in RUNS:
        try:
            results[f"{method}-{micro}"] = _run(method, micro, rank, world)
        except Exception as exc:  # reported by the parent
            results[f"{method}-{micro}"] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
    from natasha_ext.optim import KFACPreconditioner

    with warnings.catch_warnings(record=True) as caught:  # not DDP, no group: said
        warnings.simplefilter("always")
        KFACPreconditioner(_net(bn=False), "kfac")
    results["warned"] = any("no process_group" in str(w.message) for w in caught)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(WORLD, _free_port(), d), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method,micro", RUNS, ids=[f"{m}-micro{k}" for m, k in RUNS])
def test_ddp_equals_one_process_on_the_concatenated_batch(two_ranks, method, micro):
    r0, r1 = (res[f"{method}-{micro}"] for res in two_ranks)
    assert not isinstance(r0, str), r0
    assert not isinstance(r1, str), r1
    assert torch.equal(r0, r1), "ranks diverged"
    single = _run(method, 1)
    assert not torch.equal(single, torch.cat([p.detach().reshape(-1) for p in _net(bn=False).parameters()]))
    torch.testing.assert_close(r0, single, rtol=1e-9, atol=1e-11)


def test_a_rank_without_a_group_is_warned(two_ranks):
    assert all(res["warned"] for res in two_ranks)
