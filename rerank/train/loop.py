"""The training loop: AdamW, accumulation, clipping, checkpointing, bf16, exact resume, logs, DDP.

One entry point for every setting: ``locore train`` on a CPU, or ``torchrun --nproc-per-node=N
-m locore train ...`` on N GPUs (DDP is used whenever ``WORLD_SIZE > 1``). Checkpoints
(``checkpoint-<step>/``) hold ``model.safetensors`` + ``config.json`` (loadable by
``LocoreModel.from_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, step, log) and one
``rng_state_<rank>.pt`` per process, so a resumed run continues the loss curve exactly. Which
lists a step sees and how each is shuffled are functions of ``(seed, position in the sample
stream)``, never of how often the process was restarted.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from locore.core.atomic import write_text
from locore.core.device import autocast, resolve_device
from locore.core.errors import UserError
from locore.rerank.locore.model import MODES, RECALL_AT, LocoreModel
from locore.rerank.train.baselines import list_recalls
from locore.rerank.train.data import DataConfig, ListDataset, Lists, make_dataset
from locore.rerank.train.init import init_model

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear")
STATE_FILE = "trainer_state.pt"
BASELINES_FILE = "baselines.json"  # training-free recalls of the same lists (baselines.py)
SELECTED_FILE = "selected.json"  # which checkpoint the final model is, when `best` is set
STAT_NAMES = ("loss", *(f"{m}/recall@{k}" for m in MODES for k in RECALL_AT))
VALIDATION_KEYS = tuple(f"val/{name}" for name in STAT_NAMES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run (``configs/train/*.yaml``; defaults follow reference-spec §5.4)."""

    data: DataConfig = DataConfig()  # where the lists come from
    validation: DataConfig = DataConfig()  # held-out lists scored at every checkpoint ("" = none)
    model: str = "micro"  # architecture: preset name (configs/rerankers) or YAML path
    model_overrides: dict = dataclasses.field(default_factory=dict)  # preset keys to change
    init: str = "scratch"  # scratch | scratch-identity | our checkpoint | Longformer/RoBERTa/HF id
    init_layers: int = 0  # keep the first N pretrained layers (0 = all; official num_layers_kept)
    out: str = "runs/locore"  # run folder: checkpoints, logs, final model
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # lists per forward pass (per process)
    grad_accum: int = 1  # forward passes per optimiser step
    lr: float = 5e-5  # AdamW learning rate (official)
    weight_decay: float = 0.0  # official: none
    schedule: str = "constant"  # constant | linear (decay to 0 at `steps`)
    warmup_steps: int = 0  # linear warm-up before the schedule (official: none)
    max_grad_norm: float = 1.0  # gradient clipping (HF default)
    bf16: bool = False  # autocast in bfloat16 (official: float32)
    gradient_checkpointing: bool = False  # recompute each layer in backward (official: on)
    backend: str = "fast"  # attention backend: fast | hf
    log_every: int = 10  # optimiser steps per log row
    save_every: int = 200  # optimiser steps per checkpoint
    best: str = ""  # validation metric that picks the final model (e.g. val/max-end/recall@1)
    seed: int = 42  # model init, sample order, shuffling, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: the process's GPU under torchrun)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train {name}={getattr(self, name)} must be at least 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown train schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.save_every % self.log_every:
            # A checkpoint in the middle of a log window would lose that window's losses.
            raise UserError(
                f"train save_every={self.save_every} must be a multiple of log_every="
                f"{self.log_every}"
            )
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise UserError("train lr and max_grad_norm must be positive")
        if self.best:
            if not self.validation.features:
                raise UserError(f"train best={self.best!r} needs validation.features; set both")
            if self.best not in VALIDATION_KEYS:
                raise UserError(
                    f"unknown train best {self.best!r}; choose one of {list(VALIDATION_KEYS)}"
                )


def sample_stream(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Items ``start .. start + count`` of the endless concatenation of per-epoch permutations."""
    out = []
    while count > 0:
        epoch, pos = divmod(start, n)
        take = np.random.default_rng([seed, epoch]).permutation(n)[pos : pos + count]
        out.append(take)
        start, count = start + len(take), count - len(take)
    return np.concatenate(out)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of ``lr`` at optimiser step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "linear":
        span = max(1, config.steps - config.warmup_steps)
        return max(0.0, 1.0 - (step - config.warmup_steps) / span)
    return 1.0


def enable_gradient_checkpointing(model: LocoreModel, backend: str) -> None:
    """Recompute every encoder layer during backward instead of storing its activations.

    The model's layers (``fast``) or the transformers layers sharing its weights (``hf``) get a
    checkpointed ``forward``; dropout masks are replayed (``preserve_rng_state``), so the
    gradients equal those without checkpointing.
    """
    layers = (
        model._hf_encoder().layer
        if backend == "hf"
        else model.language_model.longformer.encoder.layer
    )
    for layer in layers:
        plain = type(layer).forward.__get__(layer)
        layer.forward = functools.partial(checkpoint, plain, use_reentrant=False)


def _latest_checkpoint(out: Path) -> Path | None:
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(config: TrainConfig, dataset: Lists | None = None) -> Path:
    """Run (or resume, when ``out`` holds a checkpoint) training; returns the run folder.

    Args:
        config: the run.
        dataset: lists to train on; default: :class:`ListDataset` of ``config.data``.

    Returns:
        ``config.out``, holding the final ``model.safetensors`` + ``config.json``, ``log.jsonl``,
        ``log.csv``, ``loss.png`` and the checkpoints.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(config.device)
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else make_dataset(config.data, config.seed)
    held_out = ListDataset(config.validation, config.seed) if config.validation.features else None
    resume = _latest_checkpoint(out)
    if rank == 0 and not (out / BASELINES_FILE).is_file():
        write_baselines(out / BASELINES_FILE, data, held_out)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    if resume is not None:
        model = LocoreModel.from_pretrained(resume, backend=config.backend, device=device)
    else:
        model = init_model(
            config.model, config.init, config.backend, config.init_layers, config.model_overrides
        )
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config))
    step, log = 0, []
    torch.manual_seed(config.seed + rank)  # dropout differs per rank, as under HF Trainer
    if resume is not None:
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, log = state["step"], state["log"]
        rng_file = resume / f"rng_state_{rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{rng_file} is missing; resume with the same number of processes")
        _set_rng_state(torch.load(rng_file, weights_only=False), device)
        logger.info("resumed from %s at step %d", resume, step)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config.backend)
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if distributed
        else model
    )
    per_step = config.batch_size * config.grad_accum * world
    window: list[torch.Tensor] = []
    started = time.perf_counter()
    first = step
    with tqdm(
        total=config.steps,
        initial=step,
        desc="train",
        unit="step",
        disable=rank > 0,
        dynamic_ncols=True,
    ) as bar:
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            for a in range(config.grad_accum):
                start = step * per_step + (a * world + rank) * config.batch_size
                idx = sample_stream(len(data), config.seed, start, config.batch_size)
                draws = np.arange(start, start + config.batch_size)
                inputs = data.batch(idx, draws).to(device)
                last = a == config.grad_accum - 1
                sync = net.no_sync() if distributed and not last else contextlib.nullcontext()
                with sync:
                    with autocast(device, torch.bfloat16 if config.bf16 else None):
                        output = net(inputs)
                    (output.loss / config.grad_accum).backward()
                window.append(_stats(output))
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                row = _log_row(window, distributed)
                if held_out is not None and (step % config.save_every == 0 or step == config.steps):
                    row.update(validate(model, held_out, config.batch_size, device))
                elapsed = time.perf_counter() - started
                row = {"step": step, "lr": lr, **row}
                row["steps_per_s"] = (step - first) / max(elapsed, 1e-9)
                log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_s']:.2f}")
                window, started, first = [], time.perf_counter(), step
                if rank == 0:
                    write_logs(out, log)
            if step % config.save_every == 0 or step == config.steps:
                _save(
                    model, optimizer, scheduler, step, log, out / f"checkpoint-{step}", rank, device
                )
    if rank == 0:
        if config.best:
            model = select_best(out, log, config.best, config.backend)
        model.eval().save_pretrained(out)
        plot_loss(out, log)
    if distributed:
        torch.distributed.barrier()
    return out


def write_baselines(path: Path, data: Lists, held_out: Lists | None) -> dict:
    """``baselines.json``: recall@k of the training-free scores on the training lists and, as
    ``val/<score>/recall@<k>``, on the validation lists (the log's names for the model)."""
    started = time.perf_counter()
    found = list_recalls(data)
    if held_out is not None:
        found |= {f"val/{k}": v for k, v in list_recalls(held_out).items()}
    write_text(path, json.dumps(found, indent=1) + "\n")
    shown = {k: round(v, 3) for k, v in found.items() if k.endswith("recall@1")}
    logger.info("training-free recall@1 %s (%.1f s)", shown, time.perf_counter() - started)
    return found


def select_best(out: Path, log: list[dict], key: str, backend: str) -> LocoreModel:
    """The checkpoint with the best ``key`` (lowest loss, else highest recall; the earliest of
    equals), recorded in ``out/selected.json``: early stopping on the validation lists, so a
    run that starts to memorise its training subjects keeps the model from before."""
    rows = [r for r in log if key in r and (out / f"checkpoint-{r['step']}").is_dir()]
    if not rows:
        raise UserError(f"no checkpoint of {out} was validated; lower save_every below steps")
    sign = 1.0 if key.endswith("loss") else -1.0
    row = min(rows, key=lambda r: (sign * r[key], r["step"]))
    folder = out / f"checkpoint-{row['step']}"
    choice = {"checkpoint": folder.name, "step": row["step"], "metric": key, "value": row[key]}
    write_text(out / SELECTED_FILE, json.dumps(choice, indent=1) + "\n")
    logger.info("final model: %s (%s = %.4f)", folder.name, key, row[key])
    return LocoreModel.from_pretrained(folder, backend=backend)


def validate(model: LocoreModel, data: Lists, batch_size: int, device) -> dict:
    """``val/<name>`` -> loss and recalls over every list of ``data`` (each image the query
    once, at draw 0, so every call scores the same lists), dropout off. Every rank computes the
    same numbers, so nothing is reduced."""
    model.eval()
    total = torch.zeros(1 + len(MODES) * len(RECALL_AT))
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            indices = np.arange(start, min(start + batch_size, len(data)))
            total += _stats(model(data.batch(indices).to(device))) * len(indices)
    model.train()
    return dict(zip(VALIDATION_KEYS, (total / len(data)).tolist()))


def _stats(output) -> torch.Tensor:
    """Loss and the 12 recalls of one forward pass, as one CPU tensor."""
    recalls = output.recalls or {}
    values = [recalls.get(f"{m}/recall@{k}", float("nan")) for m in MODES for k in RECALL_AT]
    return torch.cat([output.loss.detach().float().reshape(1).cpu(), torch.tensor(values)])


def _log_row(window: list[torch.Tensor], distributed: bool) -> dict:
    mean = torch.stack(window).mean(0)
    if distributed:
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        mean = mean.to(backend_device)
        torch.distributed.all_reduce(mean)
        mean = mean.cpu() / torch.distributed.get_world_size()
    return dict(zip(STAT_NAMES, mean.tolist()))


def _save(
    model, optimizer, scheduler, step: int, log: list, folder: Path, rank: int, device
) -> None:
    """Write ``folder`` atomically: every rank adds its RNG state before rank 0 renames it."""
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        model.save_pretrained(tmp)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "log": log,
        }
        torch.save(state, tmp / STATE_FILE)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    torch.save(_rng_state(device), tmp / f"rng_state_{rank}.pt")
    if distributed:
        torch.distributed.barrier()
    if rank == 0:
        os.replace(tmp, folder)  # a checkpoint folder exists only once complete


def write_logs(out: Path, log: list[dict]) -> None:
    """``log.jsonl`` and ``log.csv``: one row per logged step."""
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    keys = list(dict.fromkeys(k for r in log for k in r))
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(log)


def read_log(out: Path) -> list[dict]:
    """The rows of ``out/log.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def plot_loss(out: Path, log: list[dict]) -> None:
    """``loss.png``: training loss and recall@1 (max-end) against the step, and the
    validation ones where they were measured (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in log], color="tab:blue", label="loss")
    ax.set(xlabel="optimiser step", ylabel="loss", title="LoCoRe training")
    right = ax.twinx()
    right.plot(steps, [r["max-end/recall@1"] for r in log], color="tab:orange", label="R@1")
    val = [r for r in log if "val/loss" in r]
    if val:
        at = [r["step"] for r in val]
        ax.plot(at, [r["val/loss"] for r in val], "--o", color="tab:blue", label="val loss")
        recall = [r["val/max-end/recall@1"] for r in val]
        right.plot(at, recall, "--o", color="tab:orange", label="val R@1")
    right.set(ylabel="recall@1 (max-end)", ylim=(0, 1.02))
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=90)
    plt.close(fig)
