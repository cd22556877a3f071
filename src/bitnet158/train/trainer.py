"""The training loop: AdamW (β = 0.9, 0.95), the mode's schedule, gradient accumulation, periodic
held-out perplexity, a progress bar, atomic step checkpoints and exact resume.

Exactness of resume rests on three facts: the batch of a step is a pure function of (seed, step);
the schedule is a pure function of the step; weights and AdamW moments are restored bit for bit.

It is the package's only training loop. Pre-training starts from a ModelConfig; fine-tuning (the
FP → ternary conversion in ternarize.py) starts from an existing model and adds two hooks:
`on_step(step, model)` runs before each step (λ warm-up, Quant-Noise share) and
`loss_fn(logits, inputs, targets) → (loss, parts)` replaces cross-entropy (distillation).
Chat fine-tuning (sft.py) brings its own data and step contents: `batches(index) → (inputs,
targets)` replaces the random windows of a token stream (targets of IGNORE are not scored),
`eval_set` the held-out windows, and a `payload` what a step directory holds (a LoRA adapter
instead of the whole model).

With `dist` (a Dist from distributed.py: a torchrun job, or a sharded run resumed in one process)
the loop calls the wrapped model (DDP or FSDP2), trains each rank on its rows of the job's batch,
logs the mean loss over ranks, shows the bar on rank 0 only, and saves and resumes sharded steps
(dcp_steps.py). Without it the loop is exactly the one-process loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from .data import batch_for_step, eval_windows
from .data.chat import IGNORE  # a target not scored (F.cross_entropy's default ignore_index)
from .schedule import lr_and_wd

if TYPE_CHECKING:  # only for type hints: a one-process run never imports torch.distributed's parts
    from .distributed import Dist

# (logits [batch, seq, vocab], inputs, targets [batch, seq]) → (scalar loss, named parts to log)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
StepHook = Callable[[int, Transformer], None]
# micro-batch index → (inputs, targets) [batch, seq] int64; a pure function of the index (exact resume)
BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class RunPayload(Protocol):
    """What a training step directory holds besides the optimizer state, and how a resume reads it."""

    def write(self, directory: Path, model: Transformer, tokenizer) -> None: ...

    def restore(self, run_dir: Path, model: Transformer, device: torch.device) -> Path:
        """Load the newest step's weights into `model`; return that step directory."""
        ...


class ModelPayload:
    """The default: each step is a whole model directory, and a resume checks its config."""

    def write(self, directory: Path, model: Transformer, tokenizer) -> None:
        checkpoint.write_model_files(directory, model, tokenizer)

    def restore(self, run_dir: Path, model: Transformer, device: torch.device) -> Path:
        directory = checkpoint.resolve(run_dir)
        loaded, _ = checkpoint.load(directory, device=device, with_tokenizer=False)
        if loaded.config != model.config:
            raise CheckpointError(f"{directory}: its model config differs from the one asked for; "
                                  "resume with the same preset and options")
        model.load_state_dict(loaded.state_dict())
        return directory


@dataclass
class TrainResult:
    model: Transformer
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step
    evals: list[dict[str, Any]] = field(default_factory=list)    # one row per evaluation
    run_dir: Path | None = None
    seconds: float = 0.0
    tokens: int = 0

    @property
    def final_perplexity(self) -> float:
        return self.evals[-1]["perplexity"] if self.evals else float("nan")


def cross_entropy(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The default loss: mean next-token cross-entropy, nothing extra to log."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long()), {}


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, never on norm gains; frozen
    parameters (a LoRA run's base) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "decay": True}, {"params": rest, "decay": False}]


@torch.no_grad()
def evaluate(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over fixed held-out windows."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten().long(), reduction="sum",
                                 ignore_index=IGNORE).item()
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def train(model: ModelConfig | Transformer, train_config: TrainConfig, train_tokens: torch.Tensor | None,
          heldout_tokens: torch.Tensor | None = None, *, tokenizer=None, run_dir: str | Path | None = None,
          resume: bool = False, until: int | None = None, progress: bool = True, desc: str | None = None,
          on_step: StepHook | None = None, loss_fn: LossFn | None = None, batches: BatchFn | None = None,
          eval_set: tuple[torch.Tensor, torch.Tensor] | None = None,
          payload: RunPayload | None = None, dist: "Dist | None" = None) -> TrainResult:
    """Train `model` (a ModelConfig: a new model drawn from `train_config.seed`; a Transformer:
    that model, in place) and return it with its loss history and held-out evaluations.

    `until` stops early (after saving a checkpoint there), as a run cut off at that step would;
    `resume=True` continues from `run_dir`'s latest step. `on_step(step, model)` runs before each
    step; `loss_fn` replaces cross-entropy and the parts it returns join each history row
    (averaged over micro-batches). Without `heldout_tokens` nothing is evaluated. `batches` and
    `eval_set` stand in for the two token streams (train_tokens is then None); `payload` says what
    a step directory holds (default: the whole model); `dist` trains as one rank of a job (see the
    module's docstring)."""
    tc = train_config.validate()
    given = model if isinstance(model, Transformer) else None
    mc = (given.config if given is not None else model).validate()
    device = resolve_device(tc.device)
    n_tokens = 0 if train_tokens is None else train_tokens.numel()
    if batches is None and n_tokens <= tc.seq_len + 1:
        raise ConfigError(f"the training text has {n_tokens} tokens, fewer than one "
                          f"window of seq_len {tc.seq_len}; give more data or a smaller --seq-len")
    if tc.seq_len > mc.max_seq_len:
        raise ConfigError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}")
    run_dir = Path(run_dir) if run_dir is not None else None

    loss_fn = loss_fn or cross_entropy

    torch.manual_seed(tc.seed)
    model = given if given is not None else Transformer(mc)
    model.to(device).train()
    if dist is not None and payload is not None:
        raise ConfigError("a sharded run saves the whole model; a payload needs a one-process run")
    if dist is not None and tc.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {tc.batch_size} must split evenly over {dist.world_size} processes")
    net = dist.wrap(model) if dist is not None else model  # what the loop calls (DDP / FSDP2)
    progress = progress and (dist is None or dist.is_main)
    optimizer = torch.optim.AdamW(param_groups(model), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    if eval_set is None and heldout_tokens is not None:
        eval_set = eval_windows(heldout_tokens, tc.seq_len, tc.eval_batches * tc.batch_size)
    # rows per micro-batch and micro-batches per step on this rank; a job keeps its layout on resume
    layout = dist.layout(tc) if dist is not None else None
    rows, accum = (layout["rows"], layout["units"] // dist.world_size) if dist is not None else \
        (tc.batch_size, tc.grad_accum)
    if batches is None:
        def batches(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return batch_for_step(train_tokens, index, rows, tc.seq_len, tc.seed)
    payload = payload or ModelPayload()

    start, history, evals, elapsed = 0, [], [], 0.0
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs a run directory")
        if dist is not None:
            from .dcp_steps import restore_step  # torch.distributed.checkpoint: sharded runs only
            state = restore_step(dist, run_dir, model, optimizer)
            layout = dist.layout(tc, state.get("layout"))
            rows, accum = layout["rows"], layout["units"] // dist.world_size
        else:
            directory = payload.restore(run_dir, model, device)
            state = checkpoint.load_training_state(directory, model, optimizer)
        start, history, evals = state["step"], state.get("history", []), state.get("evals", [])
        elapsed = state.get("seconds", 0.0)

    stop = min(tc.steps, until) if until is not None else tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    bar = tqdm(total=tc.steps, initial=start, desc=desc or f"train {mc.mode}", disable=not progress,
               unit="step", dynamic_ncols=True, mininterval=1.0)
    t_start = time.perf_counter()
    for step in range(start, stop):
        if on_step is not None:
            on_step(step, model)
        lr, wd = lr_and_wd(tc, mc.mode, step)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, (wd if group["decay"] else 0.0)
        t0 = time.perf_counter()
        loss_sum, parts_sum = 0.0, {}
        for micro in range(accum):
            index = step * accum + micro
            if dist is not None:  # W ranks draw W consecutive batches of B / W rows (distributed.py)
                index = index * dist.world_size + dist.rank
            x, y = batches(index)
            x, y = x.to(device), y.to(device)
            with dist.sync(net, micro == accum - 1) if dist is not None else contextlib.nullcontext():
                with dist.autocast() if dist is not None else contextlib.nullcontext():
                    loss, parts = loss_fn(net(x), x, y)
                loss = loss / accum
                loss.backward()
            loss_sum += loss.item()
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value / accum
        if tc.grad_clip > 0:
            if dist is not None:
                dist.clip_grad_norm_(model, tc.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist is not None:  # every rank logs (and checks) the job's loss: the mean over equal row counts
            loss_sum = dist.mean(loss_sum)
            parts_sum = {name: dist.mean(value) for name, value in parts_sum.items()}
        if not math.isfinite(loss_sum):
            raise ConfigError(f"training diverged at step {step + 1} (loss {loss_sum}); lower --lr")
        dt = time.perf_counter() - t0
        history.append({"step": step + 1, "loss": loss_sum, "lr": lr, "weight_decay": wd, **parts_sum})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)

        done = step + 1
        if eval_set is not None and (done % tc.eval_every == 0 or done == tc.steps):
            with dist.evaluating() if dist is not None else contextlib.nullcontext():
                # every rank evaluates: FSDP2's forward needs all of them
                eval_loss = evaluate(net, *eval_set, tc.batch_size)
            evals.append({"step": done, "loss": eval_loss, "perplexity": math.exp(eval_loss)})
            bar.write(f"  step {done}: held-out loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}") \
                if progress else None
        if run_dir is not None and (done % tc.save_every == 0 or done == stop) and dist is not None:
            from .dcp_steps import save_step
            save_step(dist, run_dir, done, model, optimizer, tokenizer,
                      {"history": history, "evals": evals, "train_config": tc.to_dict(),
                       "layout": layout, "seconds": elapsed + time.perf_counter() - t_start},
                      keep=tc.keep_checkpoints)
        elif run_dir is not None and (done % tc.save_every == 0 or done == stop):
            checkpoint.save_training_checkpoint(
                run_dir, done, model, tokenizer, optimizer,
                {"history": history, "evals": evals, "train_config": tc.to_dict(),
                 "seconds": elapsed + time.perf_counter() - t_start}, keep=tc.keep_checkpoints,
                write=lambda directory: payload.write(directory, model, tokenizer))
    bar.close()
    seconds = elapsed + time.perf_counter() - t_start
    return TrainResult(model=model, history=history, evals=evals, run_dir=run_dir, seconds=seconds,
                       tokens=len(history) * tokens_per_step)
