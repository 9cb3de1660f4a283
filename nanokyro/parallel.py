"""Tensor and pipeline parallelism on torch.distributed: which shard of the model a rank holds, the process
groups and collectives, and the worker processes.

World = pp * tp ranks; rank = stage * tp + tp_rank. Rank 0 (stage 0, TP rank 0) runs the scheduler and the
sampler. Every step it broadcasts the step's plan (msgspec bytes, as a uint8 tensor over a gloo group) to the
other ranks, which run their shard of the same step: TP ranks all-reduce inside the layers (layers.py), a
pipeline stage receives the hidden states and residual of the stage before and sends its own to the next, and
the last stage sends the sampled rows' logits to rank 0, on a group of their own. Rank 0 alone samples. In a
pipeline, rank 0 neither waits for the others to take a plan nor for a step's logits before it launches the next
step (core.py keeps a step per stage in flight): every rank runs the plans in the order sent, and each pair of
ranks sends and receives its hidden states, and its logits, in that order, so every send meets its receive.
On CUDA, an all-reduce of at most SYMM_BYTES (a decode step's) goes through symmetric memory, one kernel that
reads the other GPUs' buffers over NVLink; larger ones, and every other collective, through NCCL. A decoder
layer's all-reduces go with the RMSNorm after them (all_reduce_rms_norm): up to FUSED_ROWS rows, one kernel
each (small_batch.all_reduce_rms_norm, over the same buffer's tail), which in the one- and two-row graphs only
receives: the row-parallel GEMV before it sends the parts (layers.RowParallelLinear.part). The first of them also
sums the embedding: rank 0 holds the whole table and looks every id up, the others pass zeros, so the tokens rank 0
samples, which the next step's input ids read while still on their way to the host (placeholders), never leave it.

Ranks start either as processes that rank 0 spawns (one node: `LLM(..., tensor_parallel_size=N)`), or all at once
under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), where ranks > 0 serve until rank 0 stops.
Backends: NCCL on CUDA, gloo on CPU; the plan always travels over gloo (a CPU tensor).

A worker that dies closes its sockets: gloo then fails rank 0's next collective at once, and a watcher thread on
rank 0 names the worker and its exit code (and on NCCL aborts the groups, whose collectives would otherwise
wait for their timeout, and exits if the GPU stays stuck in a symmetric-memory all-reduce). Every collective
failure after that is a `WorkerError`.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanokyro import small_batch
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.profiling import unrecorded

log = logging.getLogger("nanokyro.parallel")

# Workers wait for the next plan as long as the server idles: the control group's collectives never time out.
IDLE_TIMEOUT = datetime.timedelta(days=365)
START_TIMEOUT = datetime.timedelta(minutes=5)  # for spawned workers to reach the rendezvous
JOIN_TIMEOUT_S = 5.0
STUCK_S = 5.0  # after a worker died, how long the GPU may stay busy before rank 0 exits (Workers._exit_if_stuck)


class WorkerError(RuntimeError):
    """A rank other than this one died or failed: the engine cannot step any more."""


@dataclass(frozen=True)
class Shard:
    """The part of the model a rank holds: its TP slice of every layer of its pipeline stage."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def layers(self, num_layers: int) -> range:
        """This stage's layers: contiguous, the first `num_layers % pp_size` stages one longer."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (self.pp_rank < extra))

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def num_heads(self, cfg: ModelConfig) -> int:
        return cfg.num_heads // self.tp_size

    def num_kv_heads(self, cfg: ModelConfig) -> int:
        return max(1, cfg.num_kv_heads // self.tp_size)


def check(cfg: EngineConfig, model_cfg: ModelConfig) -> None:
    """Refuse, before any process starts, a layout the model or the machine cannot take."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    if model_cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {model_cfg.num_heads} attention heads")
    kv = model_cfg.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(f"tensor_parallel_size {tp} and the model's {kv} KV heads: one must divide the other")
    if model_cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the MLP's {model_cfg.intermediate_size} features")
    if pp > model_cfg.num_layers:
        raise ValueError(f"pipeline_parallel_size {pp} is deeper than the model's {model_cfg.num_layers} layers")
    if cfg.torch_device().type == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", tp * pp))
        if local > torch.cuda.device_count():
            raise ValueError(f"{local} ranks on this node but only {torch.cuda.device_count()} GPUs")


# -- collectives; as custom ops under torch.compile, so a TP forward stays one graph and CUDA graphs capture them -

# Up to this many bytes, a CUDA all-reduce goes through symmetric memory: each rank copies its part into a buffer
# every rank of the group maps, and one kernel reads the others' over NVLink. Two H200s, inside a CUDA graph:
# 6.3 us at one 4096-wide bf16 row where NCCL takes 22.9; 12.8 us (two-shot) at 256 rows where NCCL takes 41.3.
SYMM_BYTES = 8 << 20
ONE_SHOT_BYTES = 128 << 10  # past this, two-shot (reduce-scatter + all-gather over the same buffer) is faster

_groups: dict[int, Group] = {}
_handles = itertools.count()


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    nbytes = x.numel() * x.element_size()
    if group.symm is None or nbytes > SYMM_BYTES:
        out = x.clone()
        dist.all_reduce(out, group=group.pg)
        return out
    if nbytes <= ONE_SHOT_BYTES:  # the kernel copies x into this rank's buffer itself: one launch, not two
        buf = group.symm.view(x.dtype)[: x.numel()].view_as(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group.pg.group_name)
    return two_shot_in_buffer(x, group).clone()


def two_shot_in_buffer(x: torch.Tensor, group: Group) -> torch.Tensor:
    """x summed over the group by the two-shot kernel, in place in the group's symmetric buffer: a view of the
    buffer, good until its next use."""
    buf = group.symm.view(x.dtype)[: x.numel()].view_as(x)
    buf.copy_(x)
    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.pg.group_name)
    return buf


def all_gather(x: torch.Tensor, pg: dist.ProcessGroup, size: int) -> torch.Tensor:
    """x [R, n] of each of `size` ranks -> [size * R, n], rank by rank."""
    out = x.new_empty(size * x.shape[0], x.shape[1])
    dist.all_gather_into_tensor(out, x.contiguous(), group=pg)
    return out


@torch.library.custom_op("nanokyro::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor, handle: int) -> torch.Tensor:
    return all_reduce(x, _groups[handle])


@_all_reduce.register_fake
def _(x, handle):
    return torch.empty_like(x)


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: Group,
                        sent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """rms_norm(x summed over the group's ranks, residual) on CUDA with symmetric memory. Up to FUSED_ROWS rows, one
    kernel (small_batch.all_reduce_rms_norm; `sent`: the GEMV that computed x already sent it to the other ranks);
    for a two-shot all-reduce, summed in place in the buffer and normalised from there (no copy out); past
    SYMM_BYTES, NCCL's all-reduce and then the norm."""
    nbytes = x.numel() * x.element_size()
    assert not sent or x.shape[0] <= small_batch.FUSED_ROWS, "only the one-kernel path receives sent parts"
    if x.shape[0] <= small_batch.FUSED_ROWS:
        return small_batch.all_reduce_rms_norm(x, residual, weight, eps, *group.fused, sent=sent)
    if ONE_SHOT_BYTES < nbytes <= SYMM_BYTES:
        summed = two_shot_in_buffer(x, group)
    else:
        summed = all_reduce(x, group)
    return torch.ops.nanokyro.rms_norm(summed, residual, weight, eps)


@torch.library.custom_op("nanokyro::all_reduce_rms_norm", mutates_args=())
def _all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                         handle: int, sent: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """all_reduce_rms_norm over the group's buffer: its slots and epoch counters are the group's state, not
    arguments, so the compiled graph neither copies them nor sees them as mutated."""
    return all_reduce_rms_norm(x, residual, weight, eps, _groups[handle], sent)


@_all_reduce_rms_norm.register_fake
def _(x, residual, weight, eps, handle, sent):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("nanokyro::all_gather", mutates_args=())
def _all_gather(x: torch.Tensor, handle: int, size: int) -> torch.Tensor:
    return all_gather(x, _groups[handle].pg, size)


@_all_gather.register_fake
def _(x, handle, size):
    return x.new_empty(size * x.shape[0], x.shape[1])


def _symmetric_buffer(pg: dist.ProcessGroup, device: torch.device) -> tuple[torch.Tensor, tuple] | None:
    """A buffer that every rank of `pg` maps (a collective: all its ranks call it together), or None where
    symmetric memory is not there (CPU, no peer access between the GPUs): NCCL then does every all-reduce. Its
    first SYMM_BYTES serve `all_reduce`; the rest, small_batch.all_reduce_rms_norm: with it, the arguments that
    kernel takes after the norm's (every rank's slots, this rank's epoch counters, rank, size)."""
    if device.type != "cuda":
        return None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(SYMM_BYTES + small_batch.fused_data_bytes(pg.size()), dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, pg.group_name)
        buf[SYMM_BYTES:].zero_()  # epoch 0 in every slot, on every rank before any rank sends
        torch.cuda.synchronize(device)
        dist.barrier(group=pg, device_ids=[device.index])
        slots = torch.tensor([ptr + SYMM_BYTES for ptr in handle.buffer_ptrs], dtype=torch.int64, device=device)
        epochs = torch.zeros(small_batch.FUSED_ROWS, dtype=torch.int32, device=device)
        fused = (slots, epochs, pg.rank(), pg.size())
        return buf[:SYMM_BYTES], fused
    except Exception as e:  # noqa: BLE001 - any failure here only costs speed
        log.warning("symmetric memory unavailable (%r): all-reduces go through NCCL", e)
        return None


class Group:
    """The ranks that one layer is split over (this rank's TP group). Size 1: no process group, no collectives."""

    def __init__(self, rank: int = 0, size: int = 1, pg: dist.ProcessGroup | None = None,
                 device: torch.device | None = None):  # fmt: skip
        self.rank, self.size, self.pg = rank, size, pg
        symm = _symmetric_buffer(pg, device) if pg is not None and device is not None else None
        self.symm, self.fused = symm or (None, None)
        self.handle = next(_handles)
        _groups[self.handle] = self

    # Eager code calls torch.distributed directly: a custom op's first call costs seconds on the CPU.
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.nanokyro.all_reduce(x, self.handle)
        return all_reduce(x, self)

    def fuses(self, hidden: int) -> bool:
        """Whether all_reduce_rms_norm takes parts of `hidden` values a row through the symmetric buffer."""
        return self.fused is not None and small_batch.FUSE_ALL_REDUCE and hidden <= small_batch.FUSED_HIDDEN

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            sent: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """(rms_norm(x summed over the ranks + residual) * weight, that sum + residual) through the symmetric
        buffer (all_reduce_rms_norm), where the group `fuses` x's rows; else None. `sent`: the GEMV that computed
        x sent it already (RowParallelLinear.part)."""
        if not self.fuses(x.shape[-1]):
            assert not sent, "a part was sent for a norm that does not fuse the all-reduce"
            return None
        if torch.compiler.is_compiling():
            return torch.ops.nanokyro.all_reduce_rms_norm(x, residual, weight, eps, self.handle, sent)
        return all_reduce_rms_norm(x, residual, weight, eps, self, sent)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, n] -> [R, size * n]: every rank's columns side by side, in rank order."""
        R, n = x.shape
        if torch.compiler.is_compiling():
            out = torch.ops.nanokyro.all_gather(x, self.handle, self.size)  # [size * R, n]
        else:
            out = all_gather(x, self.pg, self.size)
        return out.view(self.size, R, n).transpose(0, 1).reshape(R, self.size * n)


SINGLE = Group()


# -- this rank's place in the world --------------------------------------------------------------------------


class Parallel:
    """One rank's shard, device and groups, and what it sends to and receives from the others per step. On rank 0
    of a world > 1 it also holds the spawned workers (None under torchrun)."""

    def __init__(self, shard: Shard, device: torch.device, rank: int = 0, world_size: int = 1,
                 tp: Group = SINGLE, control: dist.ProcessGroup | None = None, workers: Workers | None = None,
                 logits: dist.ProcessGroup | None = None):  # fmt: skip
        self.shard, self.device, self.rank, self.world_size = shard, device, rank, world_size
        self.tp, self.control, self.workers, self.logits = tp, control, workers, logits
        self.failure: str | None = None  # set once a collective failed: every later step fails at once
        self.closed = False
        self._plans_sent: list[tuple[dist.Work, torch.Tensor]] = []  # rank 0: plan broadcasts not yet taken
        self._unposted: collections.deque[PendingLogits] = collections.deque()  # rank 0: logits not yet received
        self._logits_sent: list[tuple[dist.Work, torch.Tensor]] = []  # the last stage: logits not yet sent

    @contextlib.contextmanager
    def guard(self):
        """Turn a collective's failure into a WorkerError naming what died; refuse to run after one."""
        if self.failure is None and self.workers is not None:
            self.failure = self.workers.failure
        if self.failure is not None:
            raise WorkerError(self.failure)
        try:
            yield
        except Exception as e:  # a collective failed, or this rank failed mid-step: the ranks are out of step
            dead = self.workers.wait_failure(1.0) if self.workers is not None else None
            self.failure = dead or f"a step failed part-way and left the ranks out of step: {e!r}"
            raise WorkerError(self.failure) from e

    # The plan: bytes, broadcast from rank 0 over the gloo control group (size first; -1 means stop).

    def send_plan(self, data: bytes | None) -> None:
        """Rank 0 does not wait for the others to take the plan (gloo's send waits for the receiver): in a
        pipeline they are still busy with the steps before it. The stop (None) is waited for."""
        self._plans_sent = [(w, t) for w, t in self._plans_sent if not w.is_completed()]
        tensors = [torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)]
        if data is not None:
            tensors.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        for t in tensors:  # the tensors stay referenced until sent
            with unrecorded():
                self._plans_sent.append((dist.broadcast(t, 0, group=self.control, async_op=True), t))
        if data is None:
            for work, _ in self._plans_sent:
                work.wait()

    def recv_plan(self) -> bytes | None:
        size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.control)
        if size.item() < 0:
            return None
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.control)
        return data.numpy().tobytes()

    def min(self, value: int) -> int:
        """The minimum of `value` over all ranks (the KV cache every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # Pipeline stages: the same TP rank of the next / previous stage; logits from the last stage to rank 0.

    def send_hidden(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """The hidden states and residual [T, hidden] to the next stage (or both stacked already, [2, T, hidden]).
        Rank 0 first posts the logits receives still pending (recv_logits)."""
        self.post_receives()
        dist.send((x if residual is None else torch.stack([x, residual])).contiguous(), self.rank + self.shard.tp_size)

    def recv_hidden(self, num_tokens: int, hidden: int, dtype: torch.dtype, into: torch.Tensor | None = None
                    ) -> torch.Tensor:  # fmt: skip
        """The stage before's hidden states and residual, stacked [2, T, hidden]: received into `into` if given."""
        buf = torch.empty(2, num_tokens, hidden, dtype=dtype, device=self.device) if into is None else into
        dist.recv(buf, self.rank - self.shard.tp_size)
        return buf

    @property
    def sends_logits(self) -> bool:
        """The rank that hands the logits to rank 0 in a pipeline: TP rank 0 of the last stage."""
        return self.shard.pp_size > 1 and self.shard.last_stage and self.shard.tp_rank == 0

    def send_logits(self, logits: torch.Tensor) -> None:
        """To rank 0 over the logits' own group, not waited for: the next step's layers start at once. (Sent on
        the hidden states' group and waited for, the last stage's next step waited for the send, 0.1 ms on an
        H200 at 128 rows, and then for its hidden states' receive, queued behind the send.) The tensor stays
        referenced until sent."""
        self._logits_sent = [(w, t) for w, t in self._logits_sent if not w.is_completed()]
        logits = logits.contiguous()
        with unrecorded():
            self._logits_sent.append((dist.isend(logits, 0, group=self.logits), logits))

    def recv_logits(self, rows: int, vocab: int, dtype: torch.dtype) -> PendingLogits:
        """A step's logits from the last stage, received once the receive is posted: by the next step's first
        send_hidden, after stage 0's layers of that step are queued, or by wait(), whichever comes first; in the
        order of the steps, as the last stage sends them. Posted at once, NCCL's receive kernel would hold 16 of
        the GPU's SMs, waiting, through all of the next step's layers (an H200 PP=2 profile: stage 0's kernels
        4.30 ms a step instead of ~3.5); posted after them, it waits only for what the last stage has left to
        do."""
        pending = PendingLogits(torch.empty(rows, vocab, dtype=dtype, device=self.device), None, self)
        self._unposted.append(pending)
        return pending

    def post_receives(self) -> None:
        """Post the logits receives that recv_logits left pending, oldest first."""
        while self._unposted:
            pending = self._unposted.popleft()
            with unrecorded():
                pending.work = dist.irecv(pending.buf, self.world_size - self.shard.tp_size, group=self.logits)

    def close(self, abort: bool = False) -> None:
        """Rank 0: stop the other ranks (a stop plan; with `abort`, e.g. mid start-up, kill the spawned ones at
        once), wait for the spawned ones, leave no process behind. Idempotent."""
        if self.world_size == 1 or self.closed:
            return
        self.closed = True
        if self.workers is not None:
            self.workers.closing = True  # their exits from now on are expected
        if self.failure is None and not abort:
            with contextlib.suppress(Exception):
                self.send_plan(None)
        if self.workers is not None:
            self.workers.close(timeout=0 if abort else JOIN_TIMEOUT_S)
        destroy_groups()


@dataclass
class PendingLogits:
    """A pipeline step's logits on their way from the last stage to rank 0."""

    buf: torch.Tensor
    work: dist.Work | None  # None until the receive is posted
    parallel: Parallel

    def wait(self) -> torch.Tensor:
        """The logits: on gloo once received; on NCCL the current stream waits for them, not the host."""
        with self.parallel.guard():
            if self.work is None:
                self.parallel.post_receives()
            self.work.wait()
        return self.buf


def _init(cfg: EngineConfig, rank: int, world_size: int, local_rank: int, store: dist.Store | None = None,
          workers: Workers | None = None) -> Parallel:  # fmt: skip
    """Join the world (through `store`, or torchrun's env://) and build this rank's groups; every rank makes the
    same groups in the same order."""
    device = cfg.torch_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=None if store else "env://", store=store, rank=rank,
                            world_size=world_size, timeout=IDLE_TIMEOUT,
                            device_id=device if backend == "nccl" else None)  # fmt: skip
    tp_size = cfg.tensor_parallel_size
    stage, tp_rank = divmod(rank, tp_size)
    tp_pg = None
    for s in range(cfg.pipeline_parallel_size):
        pg = dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) if tp_size > 1 else None
        if s == stage:
            tp_pg = pg
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend == "nccl" else dist.group.WORLD
    # rank 0 and the rank that sends it the logits: a communicator of their own (Parallel.send_logits)
    logits = dist.new_group([0, world_size - tp_size]) if cfg.pipeline_parallel_size > 1 else None
    shard = Shard(tp_rank, tp_size, stage, cfg.pipeline_parallel_size)
    tp = Group(tp_rank, tp_size, tp_pg, device) if tp_size > 1 else SINGLE
    return Parallel(shard, device, rank, world_size, tp, control, workers, logits)


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def start(cfg: EngineConfig) -> Parallel:
    """Rank 0's start: check the layout, then start the other ranks (or, under torchrun, meet them). A torchrun
    rank > 0 that gets here serves as a worker and exits when rank 0 stops."""
    if cfg.tensor_parallel_size < 1 or cfg.pipeline_parallel_size < 1:
        raise ValueError("tensor_parallel_size and pipeline_parallel_size must be at least 1")
    world_size = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if world_size == 1:
        return Parallel(Shard(), cfg.torch_device())
    from nanokyro.loader import read_config  # the loader builds models of layers that import this module

    check(cfg, read_config(cfg))
    rank = torchrun_rank()
    if rank is not None:
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks; the layout needs {world_size} "
                             f"(tensor_parallel_size {cfg.tensor_parallel_size} x pipeline_parallel_size "
                             f"{cfg.pipeline_parallel_size})")  # fmt: skip
        if rank > 0:
            serve_worker(cfg)
            sys.exit(0)
        return _init(cfg, 0, world_size, int(os.environ.get("LOCAL_RANK", 0)))
    threads = torch.get_num_threads()
    _share_cores(cfg, world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False)
    workers = Workers(cfg, world_size, store.port, threads)
    try:
        workers.wait_started(store)
        return _init(cfg, 0, world_size, 0, store, workers)
    except BaseException:
        workers.close(timeout=0)
        raise


def serve_worker(cfg: EngineConfig) -> None:
    """A torchrun rank > 0: load this rank's shard and run the steps rank 0 sends, until it stops."""
    rank = int(os.environ["RANK"])
    par = _init(cfg, rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    _serve(cfg, par)


def _serve(cfg: EngineConfig, par: Parallel) -> None:
    from nanokyro.runner import ModelRunner  # the runner imports this module

    runner = ModelRunner(cfg, parallel=par)
    try:
        runner.serve()
    finally:
        runner.release_graphs()
        destroy_groups()


def destroy_groups(timeout: float = JOIN_TIMEOUT_S) -> None:
    """Destroy this process's groups, waiting at most `timeout`: a communicator that a live CUDA graph still uses
    never finishes going (the runner drops its graphs first), and a process that is closing must not hang on it.
    NCCL's are aborted, not destroyed: no collective is wanted any more, and destroying them waited past the
    timeout at every TP=2 close on two H200s (then, at the process's exit, the waiting thread could abort it: rc
    134); with the abort the close took 2.89 s and nothing warned (docs/PERFORMANCE.md, session 17)."""
    def destroy() -> None:
        with contextlib.suppress(Exception):
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()  # (a private API: destroyed below if it fails)
                return
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    thread = threading.Thread(target=destroy, name="nanokyro-destroy", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # at exit (an unclosed LLM's finalizer), where Python 3.12 may start none (3.12.1 did not)
        log.warning("the process groups are left to the process's exit (no thread can start at exit)")
        return
    thread.join(timeout)
    if thread.is_alive():
        log.warning("the process groups did not go within %.0f s; leaving them to the process's exit", timeout)


def _share_cores(cfg: EngineConfig, world_size: int) -> None:
    """On the CPU, the ranks of one node split its cores: more threads would spin against each other."""
    if cfg.torch_device().type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def _worker_main(cfg_json: bytes, rank: int, world_size: int, port: int) -> None:
    """Entry point of a spawned worker process."""
    import msgspec

    cfg = msgspec.json.decode(cfg_json, type=EngineConfig)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    _share_cores(cfg, world_size)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=START_TIMEOUT)
        store.set(f"started/{rank}", "1")
        _serve(cfg, _init(cfg, rank, world_size, rank, store))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no atexit handlers: they could wait on the groups of a world that is gone
    os._exit(0)


class Workers:
    """Rank 0's handle on the worker processes it spawned (ranks 1..world-1), and a thread that watches them."""

    def __init__(self, cfg: EngineConfig, world_size: int, port: int, threads: int):
        import msgspec

        self.threads = threads  # rank 0's torch threads before it shared the cores, given back on close
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        cfg_json = msgspec.json.encode(cfg)
        self.procs = [ctx.Process(target=_worker_main, args=(cfg_json, r, world_size, port), daemon=True,
                                  name=f"nanokyro-rank{r}") for r in range(1, world_size)]  # fmt: skip
        for p in self.procs:
            p.start()
        self.closing = False
        self.dead: multiprocessing.Process | None = None  # the first that exited before close
        self._died = threading.Event()
        self._device = cfg.torch_device()
        threading.Thread(target=self._watch, name="nanokyro-workers", daemon=True).start()

    def _watch(self) -> None:
        """Wait on the processes' sentinels. Never reaps them (join, exitcode): two threads reaping one child
        race, and the loser sees it alive for ever. The caller's thread reads the exit code."""
        sentinels = {p.sentinel: p for p in self.procs}
        while sentinels:
            for s in multiprocessing.connection.wait(list(sentinels)):
                p = sentinels.pop(s)
                if not self.closing and self.dead is None:
                    self.dead = p
                    self._died.set()
                    if self._device.type == "cuda":  # NCCL collectives would wait for their timeout: abort them
                        with contextlib.suppress(Exception):
                            dist.distributed_c10d._abort_process_group()
                        threading.Thread(target=self._exit_if_stuck, daemon=True).start()

    def _exit_if_stuck(self) -> None:
        """A symmetric-memory all-reduce waits on the dead rank's signal inside its kernel, which nothing can abort:
        if the GPU has not drained a few seconds after the death, the step in flight never ends, and this process
        exits rather than hang (a server's frontend then fails the streams and reports the core dead)."""
        time.sleep(STUCK_S)
        if not self.closing and not torch.cuda.current_stream(self._device).query():
            log.error("%s; the GPU is stuck in a collective with it: exiting", self.failure)
            logging.shutdown()
            os._exit(1)

    @property
    def failure(self) -> str | None:
        p = self.dead
        if p is None:
            return None
        p.join(1.0)
        msg = (f"worker {p.name} (pid {p.pid}) exited with code {p.exitcode}; the engine cannot step without it "
               f"(its traceback, if any, is above)")  # fmt: skip
        log.error(msg)
        return msg

    def wait_started(self, store: dist.TCPStore) -> None:
        """Wait until every worker has reached the rendezvous store, watching them meanwhile: one that dies on
        its way (an import error, say) fails the start at once, where joining the group would wait it out."""
        keys = [f"started/{r}" for r in range(1, len(self.procs) + 1)]
        deadline = time.monotonic() + START_TIMEOUT.total_seconds()
        while not store.check(keys):
            if self.dead is not None:
                raise WorkerError(self.failure)
            if time.monotonic() > deadline:
                raise WorkerError(f"the workers did not start within {START_TIMEOUT}")
            time.sleep(0.02)

    def wait_failure(self, timeout: float) -> str | None:
        """The failure once the watcher has seen it (a collective can fail a moment before the process exits)."""
        self._died.wait(timeout)
        return self.failure

    def close(self, timeout: float) -> None:
        self.closing = True
        torch.set_num_threads(self.threads)
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
