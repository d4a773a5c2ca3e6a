"""The training loop: AdamW, accumulation, clipping, bf16 autocast, exact resume, logs, DDP.

Launch on CPU with ``locore train`` or on many GPUs with ``torchrun --nproc-per-node=N -m
engine train ...`` (the same entry point; DDP is used when ``WORLD_SIZE > 1``). Checkpoints
(``checkpoint-<step>/``) hold ``model.safetensors`` + ``config.json`` (loadable by
``LocoreModel.from_pretrained``) and ``trainer_state.pt`` (optimizer, step, RNG state, log), so
a resumed run continues the loss curve exactly. Sample order and list shuffling are functions
of ``(seed, sample counter)``, never of how often the process was restarted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rerank.locore.model import LocoreModel, build_model
from rerank.train.data import DataConfig, ListDataset

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run (``configs/train/*.yaml``)."""

    data: DataConfig
    model: str = "micro"  # preset (configs/rerankers) or a checkpoint folder to start from
    out: str = "runs/locore"  # run folder: checkpoints, logs, final model
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # lists per forward pass (per process)
    grad_accum: int = 1  # forward passes per optimiser step
    lr: float = 5e-5  # AdamW learning rate, constant schedule (official)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    bf16: bool = False  # autocast in bfloat16
    backend: str = "fast"  # attention backend: fast | hf
    log_every: int = 10
    save_every: int = 200
    seed: int = 42
    device: str = "auto"


def _init_model(config: TrainConfig, device: str) -> LocoreModel:
    path = Path(config.model)
    if (path / "model.safetensors").is_file():
        model = LocoreModel.from_pretrained(path, backend=config.backend, device=device)
    else:
        torch.manual_seed(config.seed)
        model = build_model(config.model, backend=config.backend).to(device)
    return model.train()


def _sample_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Samples ``start .. start+count`` of the endless sequence of per-epoch permutations."""
    out = []
    while count > 0:
        epoch, pos = divmod(start, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = order[pos : pos + count]
        out.append(take)
        start, count = start + len(take), count - len(take)
    return np.concatenate(out)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; returns the folder of the final model."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = config.device
    if device == "auto":
        device = (
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ListDataset(config.data, seed=config.seed)
    resume = _latest_checkpoint(out)
    model = _init_model(
        dataclasses.replace(config, model=str(resume)) if resume else config, device
    )
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    step, log = 0, []
    if resume:
        state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, log = state["step"], state["log"]
        logger.info("resumed from %s at step %d", resume, step)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        if world > 1
        else model
    )
    per_step = config.batch_size * config.grad_accum * world
    window: list[float] = []
    started = time.perf_counter()
    with tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=rank > 0) as bar:
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            recalls: dict[str, float] = {}
            for a in range(config.grad_accum):
                first = step * per_step + (a * world + rank) * config.batch_size
                idx = _sample_indices(len(data), config.seed, first, config.batch_size)
                inputs = data.batch(idx).to(device)
                with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=config.bf16):
                    output = ddp(inputs)
                (output.loss / config.grad_accum).backward()
                window.append(float(output.loss.detach()))
                recalls = output.recalls or recalls
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            if step % config.log_every == 0 or step == config.steps:
                row = {
                    "step": step,
                    "loss": float(np.mean(window)),
                    "lr": config.lr,
                    "steps_per_s": (step - (log[-1]["step"] if log else 0))
                    / max(time.perf_counter() - started, 1e-9),
                }
                row.update({k: float(v) for k, v in recalls.items() if "max-end" in k})
                log.append(row)
                window, started = [], time.perf_counter()
                if rank == 0:
                    _write_logs(out, log)
            if rank == 0 and (step % config.save_every == 0 or step == config.steps):
                _save(model, optimizer, step, log, out / f"checkpoint-{step}")
    if rank == 0:
        model.eval().save_pretrained(out)
        _plot(out, log)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def _save(model, optimizer, step: int, log: list, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "log": log,
        },
        tmp / "trainer_state.pt",
    )
    os.replace(tmp, folder)  # a checkpoint folder exists only once complete


def _write_logs(out: Path, log: list[dict]) -> None:
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    keys = sorted({k for r in log for k in r}, key=lambda k: (k != "step", k))
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(log)


def _plot(out: Path, log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set(xlabel="step", ylabel="loss", title="LoCoRe training loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=90)
    plt.close(fig)
