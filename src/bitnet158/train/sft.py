"""Chat fine-tuning (supervised, assistant tokens only) of an existing model, on the one training loop.

    method "full": every weight trains (the latent BitLinear weights: a training-form checkpoint);
                   each step directory is a model directory.
    method "lora": the ternary base is frozen as int8 codes + scale (bitnet158.lora), only the
                   adapters and their AdamW moments live in float; each step directory is a PEFT
                   adapter (adapter_config.json + adapter_model.safetensors).

Both resume like `train` (the batches are a pure function of seed and step; weights and optimizer
moments come back bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint.adapter import read_adapter, resolve_adapter, write_adapter_files
from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError
from ..lora import LoRAConfig, add_lora, factors, lora_modules, set_factors
from ..model import Transformer
from .data.chat import IGNORE, ChatData, prepare_chat_data, window_batches
from .trainer import StepHook, TrainResult, evaluate, resolve_device, train

METHODS = ("lora", "full")
# Peak LRs at a constant schedule: adapters start at zero and need a larger step than latent
# weights, which flip a ternary code only when they cross a rounding boundary.
DEFAULT_LR = {"lora": 1e-3, "full": 3e-4}


# Logits in one chunk of the loss's temporaries: 64 MB, above glibc's largest mmap threshold (32 MB),
# so each goes back to the system when freed instead of staying in the heap (and in the peak).
_LOSS_CHUNK = 1 << 24


class _LeanCrossEntropy(torch.autograd.Function):
    """F.cross_entropy's mean over the scored rows, holding one [rows, vocab] tensor in all: the
    logits themselves, whose storage becomes their gradient in backward. F.cross_entropy keeps a
    log-softmax beside them and makes two more in backward; at a 128k vocabulary each is as large
    as the frozen model's whole int8 table, so they decide LoRA's peak memory."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        step = max(1, _LOSS_CHUNK // logits.shape[1])
        lse = torch.cat([torch.logsumexp(logits[r:r + step], dim=1)
                         for r in range(0, logits.shape[0], step)])
        scored = targets != IGNORE
        picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, lse, targets)
        return torch.where(scored, lse - picked, 0.0).sum() / scored.sum()  # none scored: nan, as torch

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        scored = targets != IGNORE
        weight = torch.where(scored, grad / scored.sum(), 0.0).unsqueeze(1)  # [rows, 1]
        # no layer keeps its logits for backward, so their storage is reused (were one to, autograd
        # would refuse the step: the in-place change bumps the version it checks)
        g = logits.detach()
        step = max(1, _LOSS_CHUNK // g.shape[1])
        for r in range(0, g.shape[0], step):  # softmax, a chunk of rows at a time, in place
            g[r:r + step].sub_(lse[r:r + step].unsqueeze(1)).exp_()
        rows = scored.nonzero().squeeze(1)
        g[rows, targets[rows]] -= 1.0
        return g.mul_(weight), None


def chat_loss(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The fine-tuning loss (the trainer's loss_fn): mean cross-entropy on the scored (assistant)
    tokens, as F.cross_entropy computes it, in a third of its memory at the head."""
    return _LeanCrossEntropy.apply(logits.flatten(0, 1), targets.flatten().long()), {}


def sft_train_config(**overrides: Any) -> TrainConfig:
    """TrainConfig defaults for fine-tuning: short, constant LR after a short warm-up, no decay."""
    base = {"steps": 200, "batch_size": 8, "seq_len": 256, "warmup": 10, "schedule": "constant",
            "weight_decay": 0.0, "eval_every": 50, "save_every": 50, "eval_batches": 4}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(base)


@dataclass
class SFTResult:
    model: Transformer
    train: TrainResult
    data: ChatData
    heldout_loss_before: float | None = None

    @property
    def heldout_loss_after(self) -> float | None:
        return self.train.evals[-1]["loss"] if self.train.evals else None


class AdapterPayload:
    """LoRA run steps hold the adapter only; a resume copies it back into the model's adapters."""

    def __init__(self, config: LoRAConfig, base_model: str | None):
        self.config, self.base_model = config, base_model

    def write(self, directory: Path, model: Transformer, tokenizer) -> None:
        write_adapter_files(directory, model, self.config, self.base_model)

    def restore(self, run_dir: Path, model: Transformer, device: torch.device) -> Path:
        directory = resolve_adapter(run_dir)
        config, pairs = read_adapter(directory)
        if (config.r, config.alpha, set(config.targets)) != (self.config.r, self.config.alpha, set(self.config.targets)):
            raise CheckpointError(f"{directory}: the run's adapter (rank {config.r}, alpha {config.alpha}) differs "
                                  "from the one asked for; resume with the same LoRA options")
        modules = lora_modules(model)
        if set(pairs) != set(modules):
            raise CheckpointError(f"{directory}: the run's adapter covers other layers than this model's")
        for name, (a, b) in pairs.items():
            mine_a, mine_b = factors(modules[name])
            if a.shape != mine_a.shape or b.shape != mine_b.shape:
                raise CheckpointError(f"{directory}: {name} has other shapes than this model's adapter")
            set_factors(modules[name], a, b)
        return directory


def prepare_model(model: Transformer, method: str, lora: LoRAConfig | None) -> Transformer:
    """The model ready to fine-tune in place: LoRA adapters on a frozen base, or every weight trainable."""
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose {' or '.join(METHODS)}")
    if method == "full":
        if model.packing is not None:
            raise ConfigError("a packed checkpoint has no latent weights to fine-tune fully; use --method lora "
                              "or a training-form checkpoint")
        model.requires_grad_(True)
        return model
    add_lora(model, lora or LoRAConfig())
    return model


def sft(model: Transformer, tokenizer, conversations: Sequence[tuple[str, list[dict[str, Any]]]],
        train_config: TrainConfig, *, method: str = "lora", lora: LoRAConfig | None = None,
        heldout: float = 0.1, chat_template: str | None = None, run_dir: str | os.PathLike | None = None,
        resume: bool = False, until: int | None = None, progress: bool = True,
        base_model: str | None = None, groups: Sequence[str] | None = None,
        on_step: StepHook | None = None) -> SFTResult:
    """Fine-tune `model` (in place) on chat `conversations` ((where, messages) pairs, see
    data.chat.read_conversations), scoring the assistant's tokens only; `groups` holds out whole
    groups (the embedded set's topics) instead of single conversations; `on_step(step, model)` runs
    before each step (as in trainer.train)."""
    tc = train_config.validate()
    if tokenizer is None:
        raise CheckpointError("chat fine-tuning needs the model's tokenizer (tokenizer.json beside the weights)")
    lora = (lora or LoRAConfig()).validate() if method == "lora" else None
    if tc.lr is None:
        tc = dataclasses.replace(tc, lr=DEFAULT_LR.get(method, DEFAULT_LR["lora"]))
    if tc.seq_len > model.config.max_seq_len:
        raise ConfigError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    data = prepare_chat_data(conversations, tokenizer, tc.seq_len, heldout=heldout, seed=tc.seed,
                             template=chat_template, groups=groups)
    torch.manual_seed(tc.seed)  # the adapters' first draw follows the seed, as every later one does
    prepare_model(model, method, lora)
    eval_set = None
    if data.heldout_inputs.shape[0]:
        cap = tc.eval_batches * tc.batch_size
        eval_set = (data.heldout_inputs[:cap], data.heldout_targets[:cap])
    before = None
    if eval_set is not None and not resume:
        model.to(resolve_device(tc.device))
        before = evaluate(model, *eval_set, tc.batch_size)
    result = train(model, tc, None, tokenizer=tokenizer, run_dir=run_dir, resume=resume, until=until,
                   progress=progress, desc=f"finetune {method}", eval_set=eval_set, on_step=on_step,
                   loss_fn=chat_loss,
                   batches=window_batches(data.train_inputs, data.train_targets, tc.batch_size, tc.seed),
                   payload=AdapterPayload(lora, base_model) if lora is not None else None)
    return SFTResult(result.model, result, data, before)


def perplexity(loss: float | None) -> float:
    return math.exp(loss) if loss is not None and loss < 700 else float("nan")
