"""Training on more than one process: the process group, DDP / FSDP2 wrapping, precision, and the
rules that keep N processes equal to one.

Launch with torchrun (`torchrun --nproc-per-node N -m bitnet158 train --parallel ddp|fsdp ...`);
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `Dist.start` reads
them. gloo runs on CPU, NCCL on CUDA (one GPU per local rank), chosen from the device.

**One global batch, whatever the world size.** `--batch-size B` is the micro-batch of the whole job;
each of the W ranks trains on B / W rows of it: global batch = (B / W) per rank × W × grad_accum. A
step is cut into `units` micro-batches of `rows` windows (at the start rows = B / W, units = A·W);
unit j of step s is the batch drawn at index s·units + j, and rank r trains on units r, r + W, ...,
accumulating units / W of them (`Dist.layout`): a pure function of (seed, step, rank). DDP and FSDP2
average the gradients of equal row counts, and the logged loss is the mean over ranks. So 2 ranks
with `--batch-size 8` follow 1 process with `--batch-size 4 --grad-accum 2` (the same global batch,
the same windows): the gradient is (g₀ + g₁)/2 either way, bit for bit on CPU (halving is exact).
The layout is saved with each step and kept on resume, so a run continues on any world size that
divides `units` with the same windows (flags giving the same global batch).

**absmean sees the whole weight under FSDP2.** `fully_shard` keeps each parameter as a dim-0 shard
(a DTensor) between steps, but its forward pre-hook all-gathers a block's parameters into the
full, unsharded tensors before the block's forward runs and frees them after; BitLinear's
forward therefore reads the whole [out, in] weight, and absmean (mean|W| over every entry) is
the per-tensor statistic of one process, not of a shard (tests/test_distributed.py checks the
scale a BitLinear computes inside the sharded model against the full weight's). The quantizers
compute in fp32 whatever the parameter dtype (quant.py casts with `.float()`).

**Errors.** What every rank checks the same way (options, files on a shared filesystem) raises on
every rank: rank 0 prints the one line, the others exit 2 silently (cli/train.py). Work only one
rank does (preparing data) runs inside `agree`, which hands every rank the first failure, so no
rank waits in a collective for a peer that has given up; the process group's timeout bounds any
wait that is left.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .. import kernels
from ..config import TrainConfig
from ..errors import BitNetError, ConfigError

PARALLEL = ("ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")


@dataclass(frozen=True)
class ParallelConfig:
    """How a torchrun job trains; its defaults are `bitnet158 train`'s. `timeout` bounds every
    collective (seconds): a peer that died or hangs ends the job instead of blocking it."""

    parallel: str = "ddp"
    backend: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    timeout: float = 600.0

    def validate(self) -> "ParallelConfig":
        for name, allowed in (("parallel", PARALLEL), ("backend", BACKENDS), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.timeout > 0:
            raise ConfigError(f"--dist-timeout must be positive, got {self.timeout!r}")
        return self


class PeerFailed(BitNetError):
    """Raised on the ranks other than 0 when a peer failed (rank 0 tells the user why)."""


def launched() -> bool:
    """Whether torchrun (or srun with the same variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launch(pc: ParallelConfig, tc: TrainConfig, world: int) -> None:
    """What every rank can check before the process group exists (so no rank waits for a peer
    that has already given up): the options, the batch split, the backend for the device."""
    pc.validate()
    if tc.batch_size % world:
        raise ConfigError(f"--batch-size {tc.batch_size} is the whole job's micro-batch and must split evenly "
                          f"over the {world} processes; use a multiple of {world}")
    cuda = tc.device.startswith("cuda")
    if pc.backend == "nccl" and not cuda:
        raise ConfigError("--backend nccl needs CUDA devices (--device cuda); on CPU use gloo (the default)")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if pc.compile and not hasattr(torch, "compile"):
        raise ConfigError("--compile needs torch.compile")


class Dist:
    """This process's place in the job: rank, world size, device; collectives that are no-ops for
    one process; model wrapping. `Dist.single()` is a job of one without a process group (a
    sharded run resumed by a plain `bitnet158 train --resume`)."""

    def __init__(self, config: ParallelConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                 initialized: bool = False):
        self.config, self.device = config, device
        self.rank, self.world_size, self.initialized = rank, world_size, initialized

    @classmethod
    def single(cls, config: ParallelConfig | None = None, device: str = "cpu") -> "Dist":
        return cls(config or ParallelConfig(), torch.device(device))

    @classmethod
    def start(cls, config: ParallelConfig, device: str) -> "Dist":
        """Join the job torchrun started: one process group (gloo on CPU, NCCL on CUDA) whose
        collectives time out after `config.timeout` seconds."""
        config.validate()
        rank, world, local = env_rank(), env_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0)
        cuda = device.startswith("cuda")
        backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=config.timeout), **kwargs)
        return cls(config, dev, rank, world, initialized=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self, finished: bool = True) -> None:
        """Leave the job. After a finished run every rank first waits for the others, so none tears
        down its connections while a peer still talks to it (gloo aborted the process then, now and
        again); after an error nobody waits for a peer that may be gone."""
        if self.initialized and dist.is_initialized():
            if finished and self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
            self.initialized = False

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (the logged loss: each rank's mean over equal row counts)."""
        if not self.initialized or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it raised a BitNetError anywhere, raise on every rank: rank 0
        the first failure's message (naming the rank when it is not 0), the others PeerFailed."""
        error: BitNetError | None = None
        result = None
        try:
            result = fn()
        except BitNetError as e:
            error = e
        if not self.initialized or self.world_size == 1:
            if error is not None:
                raise error
            return result  # type: ignore[return-value]
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            if not self.is_main:
                raise PeerFailed(f"rank {failed[0][0]} failed")
            if error is not None:
                raise error
            rank, (_, message) = failed[0]
            raise PeerFailed(f"rank {rank}: {message}")
        return result  # type: ignore[return-value]

    def layout(self, tc: TrainConfig, saved: dict | None = None) -> dict[str, int]:
        """How a step's global batch is cut: `units` micro-batches of `rows` windows, unit j of step s
        drawn at index s·units + j; this rank takes units rank, rank + W, ... A resumed run keeps its
        saved layout (so any world size dividing `units` sees the same windows) and needs flags that
        give the same global batch."""
        mine = {"rows": tc.batch_size // self.world_size, "units": tc.grad_accum * self.world_size}
        if not saved:
            return mine
        try:
            rows, units = int(saved["rows"]), int(saved["units"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"the run's saved batch layout {saved!r} is not readable") from None
        if rows * units != tc.batch_size * tc.grad_accum:
            raise ConfigError(f"the run's global batch is {rows * units} windows ({units} micro-batches of {rows}); "
                              f"pass --batch-size and --grad-accum whose product is {rows * units}")
        if units % self.world_size:
            raise ConfigError(f"the run's {units} micro-batches per step cannot be split over {self.world_size} "
                              f"processes; use a world size that divides {units}")
        return {"rows": rows, "units": units}

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: activation checkpointing and torch.compile per block, then
        DDP around the model or FSDP2 per block and then the root. Parameter names do not change
        (checkpointing and compile act on each block in place), so state dicts stay the model's."""
        pc = self.config
        blocks = list(getattr(model, "layers", []))
        for block in blocks:
            if pc.activation_checkpointing:
                _checkpoint_block(block)
            if pc.compile:
                block.compile()
        if not self.initialized:
            return model
        if pc.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP  # heavy: only for a job of many
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # bf16: blocks compute and all-gather in bf16, gradients are reduced in fp32, and the sharded
        # master weights and AdamW moments stay fp32 (the optimizer sees only the sharded fp32 params)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if pc.precision == "bf16" else MixedPrecisionPolicy())
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, head
        return model

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        """Gradient clipping that gives one process's bits. Under FSDP2 on CPU each gradient's norm
        is taken over the whole gradient (all-gathered one parameter at a time, then freed) exactly
        as torch.nn.utils.clip_grad_norm_ takes it in one process; the sharded norm torch would
        take instead (sum of the shards' squares) rounds differently, and a clip coefficient one
        ulp off grows into a different run within a few steps. On CUDA the sharded norm is used
        (no gather; the runs then agree to float rounding, not bit for bit)."""
        if not (self.initialized and self.config.parallel == "fsdp" and self.device.type == "cpu"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        # the same ops as torch's foreach path on CPU (clip_grad.py): per-tensor norms, their norm
        norms = [torch._foreach_norm([self._gather_rows(g)], 2.0)[0] for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([g.to_local() if hasattr(g, "to_local") else g for g in grads], coef)

    def _gather_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a dim-0-sharded DTensor (FSDP2's layout: rank r holds rows
        [r·c, (r+1)·c), c = ceil(rows / W), the last ranks fewer or none), contiguous as one
        process holds it. Gathered with padded all_gather (gloo crashed on DTensor.full_tensor
        of FSDP2's gradient views)."""
        if not hasattr(grad, "to_local"):
            return grad
        local = grad.to_local().contiguous()
        rows = grad.shape[0]
        chunk = -(-rows // self.world_size)
        padded = local.new_zeros((chunk, *grad.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:rows].contiguous()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around the forward for DDP and a job of one; FSDP2's policy does it there."""
        if self.config.precision == "bf16" and not (self.initialized and self.config.parallel == "fsdp"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Held-out evaluation runs eagerly and, under FSDP2, with torch's ops rather than the native
        inference norm and RoPE. Inference (no autograd) takes the packed fast paths, which read
        weights through numpy: torch.compile cannot trace that, and FSDP2 frees an unsharded
        parameter by resizing its storage to 0, which a storage numpy has viewed refuses. The
        native ops round as torch does, so the perplexity is the same."""
        with contextlib.ExitStack() as stack:
            if self.config.compile:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            if self.initialized and self.config.parallel == "fsdp":
                before = kernels.current_path()
                kernels.set_path(kernels.TORCH_PATH)
                stack.callback(kernels.set_path, before)
            yield

    @contextlib.contextmanager
    def sync(self, net: nn.Module, last: bool) -> Iterator[None]:
        """Gradient accumulation: reduce gradients over ranks only on the last micro-batch."""
        if not self.initialized or self.world_size == 1:
            yield
        elif self.config.parallel == "ddp":
            with (contextlib.nullcontext() if last else net.no_sync()):
                yield
        else:
            net.set_requires_gradient_sync(last)
            yield


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute the block's activations in backward instead of keeping them (non-reentrant, so
    FSDP2's hooks and autocast see the recomputation as they saw the forward)."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # an instance attribute: the parameter names stay the block's

