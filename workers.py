"""Task-parallel workers: one FREE run spread over N processes with torch.distributed (gloo on the
CPU, nccl on GPUs), started by `free.py --workers N` or by `torchrun --nproc-per-node N free.py`.

The tasks of a round are independent (the B teachers' recoveries, the tasks of a replay meta-batch,
the meta-validation and meta-test tasks). Every worker draws the same random choices from the same
seeded generators, takes its share of the tasks, and the results are combined with collectives, so
N workers compute what one process computes, up to float summation order. In a single process
every helper here is the identity: the training loop reads the same with or without workers.
"""
import contextlib
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This worker's rank: from the process group, or from torchrun's environment before the group is joined."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main():
    """Rank 0 alone writes files and logs."""
    return rank() == 0


def my_share(n):
    """This worker's contiguous share of n tasks: range(start, end); the shares of all workers, in
    rank order, are range(n), so gathered results come back in task order."""
    w, r = world_size(), rank()
    return range(n * r // w, n * (r + 1) // w)


def sum_over_workers(tensors):
    """Sum each tensor over the workers, in place; returns them. One all-reduce of them all laid end to end:
    for a model this small, a collective's cost is mostly its latency, whatever its size."""
    if world_size() > 1 and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(summed.view_as(t))
    return tensors


def gather_from_workers(items, device="cpu"):
    """Every worker's list of results, concatenated in rank order (so: in task order), on every worker.
    Tensors travel through the CPU and arrive on `device`."""
    if world_size() == 1:
        return list(items)
    parts = [None] * world_size()
    dist.all_gather_object(parts, _to(items, torch.device("cpu")))
    return [_to(x, device) for part in parts for x in part]


def any_worker(flag):
    """True on every worker if `flag` is true on any (e.g. a Ctrl-C seen by one of them)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier():
    if world_size() > 1:
        dist.barrier()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _to(obj, device):
    """obj with every tensor it holds (in lists, tuples, dataclasses) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{name: _to(getattr(obj, name), device) for name in obj.__dataclass_fields__})
    return obj


# ------------------------------------------------------------------------ starting workers


def available(device_type):
    """How many workers this machine can hold: its GPUs on CUDA, else its CPU cores."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS: no affinity


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_device(device_type):
    """The device of this worker: its own GPU (by local rank) on CUDA, else the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", rank()))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(main, argv, n, device_type):
    """Run main(argv) in n worker processes on this machine (what torchrun does for one node) and
    wait for them; returns the exit status: 0, INTERRUPTED if Ctrl-C stopped them, else 1."""
    import torch.multiprocessing as mp
    port = free_port()
    handler = signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches the workers, which stop cleanly
    try:
        mp.spawn(_worker, args=(main, argv, n, port, device_type), nprocs=n, join=True)
        return 0
    except mp.ProcessExitedException as e:
        return INTERRUPTED if e.exit_code == INTERRUPTED else 1
    except mp.ProcessRaisedException as e:  # a programming error in a worker: its traceback
        print(e, file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, handler)


def _worker(index, main, argv, n, port, device_type):
    """One spawned worker: torchrun's environment variables, the process group, then main(argv)."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = main(argv)
    sys.exit(status or 0)


@contextlib.contextmanager
def process_group(device_type):
    """Inside torchrun (or a spawned worker): join the group torchrun's environment variables describe for
    the block (one torch thread per CPU worker), leave it after."""
    if not under_torchrun():
        yield
        return
    if device_type == "cpu":
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
