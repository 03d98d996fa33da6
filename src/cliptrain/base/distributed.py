"""torch.distributed plumbing: who we are (World), process-group set-up from torchrun or SLURM,
feature gathering with gradients, and failure propagation between ranks.

Nothing here knows about models or data; the trainer asks for a World and uses its helpers.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as "gpu[003-005,010],cpu01"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def env_from_slurm(environ: dict) -> dict:
    """torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, for
    one process per task started by `srun` (no torchrun); empty when not under such a SLURM step."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) < 2:
        return {}
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST",
                                                                                environ.get("SLURM_NODELIST", "127.0.0.1"))),
            "MASTER_PORT": environ.get("MASTER_PORT", str(29500 + int(environ.get("SLURM_JOB_ID", "0")) % 1000))}


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> World:
    """Join the process group described by torchrun's (or SLURM's) environment; a single-process World otherwise.

    One process per GPU (cuda:LOCAL_RANK, NCCL) or per CPU process (gloo).
    """
    os.environ.update(env_from_slurm(dict(os.environ)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if chosen == "nccl" else {}))
    return World(rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients of every rank and returns this rank's slice.

    Every rank computes the same global loss, so the summed gradient is world_size x the true one;
    DDP / FSDP average gradients over ranks, which brings it back to exactly the true gradient.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank in rank order (rows), differentiable (see _GatherWithGrad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _NeighbourExchange(torch.autograd.Function):
    """Send `tensor` to rank `to`, receive the same-shaped tensor from rank `source`; the backward pass
    sends the gradient back the other way, so it reaches the rank that owns the features."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to: int, source: int) -> torch.Tensor:
        ctx.to, ctx.source = to, source
        return _exchange(tensor, to, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.source, ctx.to), None, None


def _exchange(tensor: torch.Tensor, to: int, source: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def pass_to_next_rank(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Ring step: send `tensor` to rank+1 and return what rank-1 sent (differentiable)."""
    return _NeighbourExchange.apply(tensor, (world.rank + 1) % world.world_size,
                                    (world.rank - 1) % world.world_size)


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank in rank order (rows), without gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The average of `tensor` over ranks (itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return sum_over_ranks(tensor) / dist.get_world_size()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (itself in one process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `tensor` over ranks (itself in one process)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


@torch.no_grad()
def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj) -> list:
    """`obj` of every rank, in rank order (a collective; [obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_ANY_ERROR = "cliptrain/error/any"


def _error_key(rank: int) -> str:
    return f"cliptrain/error/{rank}"


def report_failure(world: World, exc: BaseException) -> None:
    """Publish this rank's error in the process group's store so the other ranks can show it."""
    if not (world.distributed and dist.is_initialized()):
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        message = f"rank {world.rank}: {type(exc).__name__}: {exc}"
        store.set(_error_key(world.rank), message)
        store.compare_set(_ANY_ERROR, "", message)  # the one key `watch_peers` polls: the first failure stays
    except Exception:  # noqa: BLE001 - best effort while failing
        pass


def peer_failure(world: World) -> str | None:
    """The error another rank published, if any (asked when a collective here failed)."""
    if not (world.distributed and dist.is_initialized()):
        return None
    try:
        return _published_failure(world)
    except Exception:  # noqa: BLE001
        return None


def _published_failure(world: World) -> str | None:
    store = dist.distributed_c10d._get_default_store()
    for rank in range(world.world_size):
        if rank != world.rank and store.check([_error_key(rank)]):
            return store.get(_error_key(rank)).decode()
    return None


class PeerWatch(threading.Event):
    """What `watch_peers` returns: set it (or `stop()`) to end the watch."""
    interval_s = 0.0
    thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Whether a thread watches."""
        return self.thread is not None

    def stop(self) -> None:
        """End the watch and wait for its thread to leave the store (before the process group goes)."""
        self.set()
        if self.thread is not None:
            self.thread.join(timeout=max(5.0, 2 * self.interval_s))


def watch_peers(world: World, interval_s: float = 2.0, unreachable_polls: int = 5,
                on_failure: Callable[[str], None] | None = None, backends: tuple[str, ...] = ("nccl",)
                ) -> PeerWatch:
    """Stop this process soon after another rank fails with an error it publishes (`report_failure`), with
    that rank's message; returns the watch (`stop()` it before leaving the process group).

    Needed under NCCL: a rank waiting in a collective for a peer that has failed is not told; it hangs
    until dist.timeout_s, and then NCCL's watchdog aborts it without a word. (Gloo's collectives fail by
    themselves, and torchrun stops the other workers when one fails; `srun` without torchrun does not.)
    A daemon thread polls one store key every `interval_s` (one request per rank, however many ranks); on a
    published failure, or after `unreachable_polls` polls in a row that cannot reach the store (its host,
    rank 0 under srun, has ended), it calls `on_failure` (default: print the message and end the process
    with status 1). A rank killed outright publishes nothing: the others still wait for dist.timeout_s.
    Only process groups of `backends` are watched.
    """
    done = PeerWatch()
    done.interval_s = interval_s
    own = f"rank {world.rank}: "

    def fail(message: str) -> None:
        print(f"error: stopping because {message}", file=sys.stderr, flush=True)
        os._exit(1)

    def watch() -> None:
        store, misses = dist.distributed_c10d._get_default_store(), 0
        while not done.wait(interval_s):
            message = None
            try:
                if store.check([_ANY_ERROR]):
                    message = store.get(_ANY_ERROR).decode()
                    message = None if message.startswith(own) else message  # this rank's own: it is failing
                misses = 0
            except Exception as exc:  # noqa: BLE001 - the store's host is gone, or going
                misses += 1
                if misses >= unreachable_polls:
                    message = (f"the job's store cannot be reached ({type(exc).__name__}: {exc}); the process "
                               f"that held it (rank 0 without torchrun) has ended")
            if message and not done.is_set():
                (on_failure or fail)(message)
                return

    if world.distributed and dist.is_initialized() and dist.get_backend() in backends:
        done.thread = threading.Thread(target=watch, name="cliptrain-peer-watch", daemon=True)
        done.thread.start()
    return done
