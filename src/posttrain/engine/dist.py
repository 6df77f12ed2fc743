"""torch.distributed in one place: process group set-up, collectives, model wrapping.

One code path serves one process (CPU or one GPU) and ``torchrun --nproc_per_node N``:
every helper here is a no-op or an identity when there is a single process, so a recipe
calls them unconditionally. On CPU the gloo backend runs the same collectives, which is how
the tests check multi-process behaviour on a laptop.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``is_main`` is rank 0: the only writer of files."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment, or run as one process.

    torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address);
    without them this is a single process on ``cuda`` when available, else ``cpu``.
    The backend is nccl when CUDA is available, gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world_size > 1:
        if cuda:
            torch.cuda.set_device(local_rank)
        if not torch_dist.is_initialized():
            device_id = torch.device("cuda", local_rank) if cuda else None
            torch_dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device_id)
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        _PEERS[:] = all_gather_objects((socket.gethostname(), os.getpid()))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


# --------------------------------------------------------------------------- a rank that dies

# (host, pid) of every rank, in rank order, gathered when the group forms: who to look for when a collective fails.
_PEERS: list[tuple[str, int]] = []
_COMM_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                  "NCCL communicator was aborted", "Socket Timeout", "Timed out")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _lost_ranks(wait: float) -> list[int]:
    """Ranks on this host whose process is gone, waiting up to `wait` seconds for an exit to show."""
    host, me = socket.gethostname(), os.getpid()
    deadline, lost = time.monotonic() + wait, []
    while not lost and time.monotonic() < deadline:
        lost = [r for r, (h, pid) in enumerate(_PEERS) if h == host and pid != me and _gone(pid)]
        if not lost:
            time.sleep(0.1)
    return lost


def _lost_error(lost: list[int], cause: str) -> Exception:
    from posttrain.errors import TrainingError

    host, me = socket.gethostname(), os.getpid()
    mine = next((r for r, (h, pid) in enumerate(_PEERS) if h == host and pid == me), -1)
    who = (", ".join(f"rank {r} (pid {_PEERS[r][1]})" for r in lost) + " exited" if lost
           else "a rank on another host stopped answering")
    return TrainingError(f"rank {mine}: lost {who}; the run cannot go on without it ({cause}). Restart the job "
                         "with resume=auto: it continues from the last checkpoint")


def peer_failure(error: BaseException, wait: float = 2.0) -> Exception | None:
    """When `error` is a collective failing because another rank died (its connection closed, a timeout), the error
    to show instead, naming the lost rank(s): those on this host whose process is gone (waiting up to `wait` seconds
    for the exit to show), or, when none is found here, a rank on another host. None for any other error."""
    dist_error = getattr(torch_dist, "DistError", ())
    if len(_PEERS) < 2 or not (isinstance(error, dist_error) or
                               (isinstance(error, RuntimeError) and any(s in str(error) for s in _COMM_FAILURES))):
        return None
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return _lost_error(_lost_ranks(wait), first)


def terminated_by_launcher(wait: float = 0.5) -> Exception | None:
    """On a SIGTERM: when another rank on this host has exited, the error naming it (torchrun terminates the
    survivors once a worker dies, often before their next collective fails and says why); None otherwise."""
    if len(_PEERS) < 2:
        return None
    lost = _lost_ranks(wait)
    return _lost_error(lost, "the launcher sent SIGTERM") if lost else None


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """A new tensor: ``t`` reduced over all ranks, on ``t``'s device. NCCL reduces CUDA tensors only, so a CPU
    tensor (a score, a count) makes the trip through the current GPU there."""
    out = t.detach().clone()
    if not _active():
        return out
    if torch_dist.get_backend() == "nccl" and out.device.type != "cuda":
        on_gpu = out.to(torch.device("cuda", torch.cuda.current_device()))
        torch_dist.all_reduce(on_gpu, op=op)
        return on_gpu.to(out.device)
    torch_dist.all_reduce(out, op=op)
    return out


def contiguous_share(n: int, dist: DistInfo | None) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of n items, ceil(n / world) each (the last ranks may get fewer or none);
    the whole range without a process group. Rank-major shares keep the items' order when gathered."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    size = -(-n // world)
    return min(n, rank * size), min(n, (rank + 1) * size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor on ``t``'s device; ``t`` itself is left alone)."""
    return _all_reduce(t, torch_dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum of ``t`` over all ranks (a new tensor on ``t``'s device)."""
    return _all_reduce(t, torch_dist.ReduceOp.MAX)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects only)."""
    if not _active():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` with one process."""
    if not _active():
        return [obj]
    parts: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, obj)
    return parts


def gather_lists(values: list) -> list:
    """Every rank's list concatenated in rank order, on every rank (``values`` itself with one process)."""
    return [v for part in all_gather_objects(values) for v in part]


class EvalShare:
    """The held-out items a rank evaluates and how its results combine into the whole set's.

    Under DDP each rank takes a contiguous share (`contiguous_share`) through the bare model (a DDP forward is a
    collective, and the shares may differ in size); `sum` and `gather` then combine the ranks' numbers. With one
    process, or an FSDP2-sharded model (whose forward needs every rank), every rank evaluates every item and both
    are the identity."""

    def __init__(self, items: list, model: nn.Module, dist: DistInfo | None):
        self.split = dist is not None and dist.distributed and not is_fsdp(model)
        lo, hi = contiguous_share(len(items), dist) if self.split else (0, len(items))
        self.items, self.model = items[lo:hi], unwrap_parallel(model) if self.split else model

    def sum(self, values: list[float]) -> list[float]:
        """Per-rank sums -> the whole set's sums."""
        if not self.split:
            return values
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def gather(self, values: list) -> list:
        """Per-rank lists -> the whole set's list, in item order."""
        return gather_lists(values) if self.split else values


class RolloutShare:
    """This rank's share of a rollout (PPO, GRPO, online DPO) and how the batch's statistics combine over ranks.

    The rollout's P prompts, `samples` samples each, are rows 0 .. P*samples-1 of one batch. Each rank takes a
    contiguous share of the prompts (`contiguous_share`: all samples of a prompt on one rank, so a group baseline
    stays local) and samples rows `row_offset` .. of `total_rows` with the uniforms one process would draw for
    them (the sampler's ``row_offset``). `sum`, `mean`, `count` and `whiten` then give the statistics of the whole
    batch, as one process holding every row computes them; with one process every method is the identity, so the
    algorithm code reads as one process."""

    def __init__(self, n_prompts: int, samples: int, dist: DistInfo | None):
        self.several = dist is not None and dist.distributed
        self.world = dist.world_size if dist is not None else 1
        self.device = dist.device if dist is not None else torch.device("cpu")
        self.lo, self.hi = contiguous_share(n_prompts, dist)
        self.row_offset, self.total_rows = self.lo * samples, n_prompts * samples

    def take(self, items: list) -> list:
        """This rank's prompts of the rollout's `items` (one per prompt)."""
        return items[self.lo: self.hi]

    def sum(self, values: list[float]) -> list[float]:
        """Per-rank sums -> the batch's sums."""
        if not self.several:
            return values
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).cpu().tolist()

    def mean(self, stats: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        """Per-rank means over equal shares -> the batch's means (keys in `summed` are per-rank sums, added up)."""
        if not self.several:
            return stats
        names = sorted(stats)
        totals = self.sum([float(stats[n]) for n in names])
        return {n: v if n in summed else v / self.world for n, v in zip(names, totals)}

    def rows_per_rank(self, global_rows: int) -> int:
        """This rank's part of a global number of rows (an optimizer step's minibatch), split evenly."""
        return global_rows // self.world

    def count(self, mask: torch.Tensor) -> int:
        """Valid positions of `mask` over the batch."""
        return int(self.sum([float(mask.sum())])[0])

    def gather(self, values: list) -> list:
        """Per-rank lists -> the batch's list, in row order."""
        return gather_lists(values) if self.several else values

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`losses.masked_whiten` of this rank's rows with the batch's mean and (Bessel-corrected) variance."""
        from posttrain.losses import masked_whiten

        if not self.several:
            return masked_whiten(x, mask, shift_mean)
        mask = mask.bool()
        valid = torch.where(mask, x, torch.zeros_like(x))
        total, count = all_reduce_sum(torch.stack([valid.sum(), mask.sum().to(valid.dtype)])).unbind()
        if count < 2:
            raise ValueError(f"whitening needs at least 2 valid positions over all ranks, got {int(count)}")
        mean = total / count
        var = all_reduce_sum(torch.where(mask, (valid - mean) ** 2, torch.zeros_like(x)).sum()) / (count - 1)
        return masked_whiten(x, mask, shift_mean, mean=mean, var=var)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        torch_dist.barrier()


# DDP wrappers made by `wrap_model`, whose gradient reducers `destroy` lets go of first (see there).
_DDP_WRAPPERS: list[nn.parallel.DistributedDataParallel] = []


def destroy() -> None:
    """Leave the process group (end of a run).

    A DDP wrapper's C++ reducer holds the gloo process group; when the wrapper is freed after the group is destroyed
    (the recipe's `model` going out of scope), the group's destructor runs under the GIL and joins gloo's worker
    threads, which can be waiting for the GIL to release a tensor: a deadlock seen at the end of 2-process runs. So the
    reducers go first, while the group is still registered, and the group is then destroyed through the path that
    releases the GIL."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        for ddp in _DDP_WRAPPERS:
            for name in ("reducer", "logger"):  # DDP's logger holds the reducer too
                if name in ddp.__dict__:
                    del ddp.__dict__[name]
        _DDP_WRAPPERS.clear()
        gc.collect()
        torch_dist.destroy_process_group()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks: the modules HF marks as never to be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: nn.Module, dist: DistInfo, strategy: str = "ddp") -> nn.Module:
    """Make ``model`` data-parallel across the job's ranks.

    ``ddp``: DistributedDataParallel (every rank holds all weights; gradients are averaged).
    ``fsdp``: FSDP2 (``fully_shard``) on CUDA — each transformer block, then the root, is
    sharded, so weights, gradients and optimizer state are split across ranks. Gradients
    are averaged over ranks too, so :func:`posttrain.engine.step.train_step` treats both
    the same. With one process the model is returned as is.
    """
    if not dist.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if strategy != "ddp":
        raise ValueError(f"unknown data-parallel strategy {strategy!r}; use 'ddp' or 'fsdp'")
    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    _DDP_WRAPPERS.append(wrapped)
    return wrapped


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is the module); a peft model stays one
    (`models.unwrap` goes on to the transformers model inside)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _parallel_parts(model: nn.Module) -> list[nn.Module]:
    """``model`` itself when it is DDP / FSDP2, else its data-parallel children (PPO's ModuleDict of policy and
    critic, each wrapped on its own)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp(model):
        return [model]
    return [m for m in model.children() if isinstance(m, nn.parallel.DistributedDataParallel) or is_fsdp(m)]


def is_parallel(model: nn.Module) -> bool:
    """True when gradients of ``model`` are averaged over ranks: DDP or FSDP2, or a container whose every child
    with trainable parameters is."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp(model):
        return True
    trainable = [m for m in model.children() if any(p.requires_grad for p in m.parameters())]
    return bool(trainable) and len(_parallel_parts(model)) == len(trainable)


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the cross-rank gradient reduction inside the block unless ``enabled``.

    Gradient accumulation only needs the reduction on the last micro-step; the earlier ones
    accumulate locally (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``).
    """
    if enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        for part in _parallel_parts(model):
            if isinstance(part, nn.parallel.DistributedDataParallel):
                stack.enter_context(part.no_sync())
            else:
                part.set_requires_gradient_sync(False)
                stack.callback(part.set_requires_gradient_sync, True)
        yield
