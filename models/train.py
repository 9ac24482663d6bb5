"""Resumable, deterministic training loop shared by dmriflow's models.

Resuming gives exactly the result of an uninterrupted run because nothing
depends on hidden state: the batch of step ``k`` is drawn from
``np.random.default_rng([seed, k])`` and the torch generator is reseeded from
``(seed, k)`` before each step (dropout, noise), the learning rate is a pure
function of the step, and the model and optimizer tensors are restored
bit-for-bit from the training state.

The training state is two files in ``state_dir`` (never a pickle):
``train_state.safetensors`` (model, optimizer and best-so-far tensors) and
``train_state.json`` (step, optimizer hyper-parameters and scalar state, loss
history, config, the sha256 of the tensor file). Both are written atomically,
the JSON last, so a run killed while saving resumes from the previous state.

Usage::

    def batch(step, rng): ...                 # any batch from (step, rng)
    def loss(model, batch): ...               # scalar tensor
    result = train(model, loss, batch, TrainConfig(steps=2000, seed=0),
                   state_dir="runs/x", resume=True, validate=val_fn)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dmriflow.interfaces import io
from dmriflow.interfaces.errors import InputError
from dmriflow.models.card import read_verified, select_device, write_weights

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
#: Default torch threads for CPU training. One: on the shared 2-core machines an
#: oversubscribed OpenMP pool made small 3D convolutions ~30x slower (measured:
#: 1.9 s vs 0.065 s per backward pass at load 14).
DEFAULT_THREADS = 1
#: Seed offset separating the torch generator's stream from numpy's.
_TORCH_SEED_BASE = 1_000_003


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored in the state and the card).

    ``lr`` follows a linear warm-up over ``warmup`` steps then a cosine decay
    to ``lr * final_lr_fraction`` at ``steps``. ``validate_every`` steps the
    ``validate`` callable scores the model; the best-scoring weights are kept.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    final_lr_fraction: float = 0.05
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 100
    log_every: int = 50
    threads: int = DEFAULT_THREADS

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        floor = self.lr * self.final_lr_fraction
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    model: torch.nn.Module
    step: int
    history: list[dict] = field(default_factory=list)      # {"step", "loss"} every log_every
    validation: list[dict] = field(default_factory=list)   # {"step", "score"}
    best_score: float | None = None
    best_step: int | None = None
    seconds: float = 0.0
    resumed_from: int = 0


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op torch threads, restoring the previous number."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The numpy generator of one step (a pure function of seed and step)."""
    return np.random.default_rng([int(seed), int(step)])


# ----------------------------------------------------------------------------
# Saving and loading the training state (safetensors + JSON)
# ----------------------------------------------------------------------------
def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(state_dir, model, opt, step: int, config: TrainConfig, history, validation,
               best: dict | None, best_score, best_step, running=(),
               extra: dict | None = None) -> Path:
    """Write the training state atomically (tensors first, then the JSON)."""
    state_dir = Path(state_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer(opt)
    tensors.update(opt_tensors)
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    sha = write_weights(tensors, state_dir / STATE_TENSORS)
    meta = {"step": step, "config": asdict(config), "optimizer": opt_meta,
            "optimizer_class": type(opt).__name__, "history": history,
            "validation": validation, "best_score": best_score, "best_step": best_step,
            "running": list(running), "tensors_sha256": sha, "extra": extra or {}}
    io.write_json(meta, state_dir / STATE_JSON)
    return state_dir


def load_state(state_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON metadata and the verified tensors of a saved training state."""
    state_dir = Path(state_dir)
    path = state_dir / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the training state ({exc})") from None
    return meta, read_verified(state_dir / STATE_TENSORS, meta.get("tensors_sha256", ""))


def _prefixed(tensors: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists and dicts
    are walked; anything else, e.g. a ``torch.Generator``, is returned as is).

    The loop applies it to every batch, so a ``batch_fn`` may build its
    tensors on the CPU whatever device the model trains on.
    """
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU if it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _loss_value(loss: torch.Tensor) -> float:
    """The loss as a float; NaN on the "meta" device (shape-only dry runs, used by
    the tests to check on a CPU that batches follow the model)."""
    return float("nan") if loss.device.type == "meta" else float(loss.detach())


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
          batch_fn: Callable[[int, np.random.Generator], Any], config: TrainConfig,
          state_dir=None, resume: bool = False,
          validate: Callable[[torch.nn.Module], float] | None = None,
          stop_after: int | None = None, device=None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps (resumable).

    ``batch_fn(step, rng)`` returns the batch of a step (tensors or anything
    ``loss_fn`` takes); its tensors are moved to the model's device
    (:func:`to_device`) before ``loss_fn`` sees them.
    ``validate(model)`` returns a score (lower is better); the best weights
    are loaded into the returned model when validation is given, else the
    last. ``state_dir``: save every ``checkpoint_every`` steps and at the end;
    ``resume`` continues from the saved state (its config must match).
    ``stop_after``: stop (saving the state) once this step count is reached -
    for tests and time-sliced runs. bf16 autocast is used on CUDA only, so CPU
    runs are deterministic.
    """
    start = time.perf_counter()
    device = select_device(device)
    model.to(device)
    opt = make_optimizer(model, config)
    step, history, validation, running = 0, [], [], []
    best, best_score, best_step = None, None, None
    if resume and state_dir is not None and (Path(state_dir) / STATE_JSON).exists():
        meta, tensors = load_state(state_dir)
        saved = TrainConfig(**meta["config"])
        if asdict(saved) != asdict(config):
            diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items()
                    if getattr(config, k) != v}
            raise ValueError(f"cannot resume {state_dir}: config changed {diff} "
                             f"(saved, now)")
        model.load_state_dict(_prefixed(tensors, "model."))
        opt.load_state_dict(_join_optimizer({k: v.to(device) for k, v in tensors.items()},
                                            meta["optimizer"]))
        step, history, validation = meta["step"], meta["history"], meta["validation"]
        best_score, best_step = meta["best_score"], meta["best_step"]
        running = list(meta.get("running", []))
        best = _prefixed(tensors, "best.") or None
    resumed_from = step
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def checkpoint():
        if state_dir is not None:
            save_state(state_dir, model, opt, step, config, history, validation, best,
                       best_score, best_step, running)

    with torch_threads(config.threads):
        while step < last:
            model.train()
            torch.manual_seed(_TORCH_SEED_BASE * config.seed + step)
            batch = to_device(batch_fn(step, step_rng(config.seed, step)), device)
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step)
            with autocast:
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            step += 1
            running.append(_loss_value(loss))
            if step % config.log_every == 0 or step == config.steps:
                history.append({"step": step, "loss": float(np.mean(running))})
                running = []
                if log:
                    log(f"step {step}/{config.steps} loss {history[-1]['loss']:.5g}")
            if validate is not None and (step % config.validate_every == 0
                                         or step == config.steps):
                model.eval()
                with torch.no_grad():
                    score = float(validate(model))
                validation.append({"step": step, "score": score})
                if best_score is None or score < best_score:
                    best_score, best_step = score, step
                    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if log:
                    log(f"step {step} validation {score:.5g} (best {best_score:.5g} "
                        f"at {best_step})")
            if step % config.checkpoint_every == 0 and step < last:
                checkpoint()
        checkpoint()
    if best is not None and step == config.steps:
        model.load_state_dict(best)
    model.eval()
    return TrainResult(model=model, step=step, history=history, validation=validation,
                       best_score=best_score, best_step=best_step,
                       seconds=time.perf_counter() - start, resumed_from=resumed_from)
