"""The training loop: AdamW with per-part learning rates, warmup + cosine, gradient accumulation,
bf16 autocast, periodic validation, atomic resumable checkpoints, clean Ctrl-C.

    result = train(model, processor, train_data, val_data, TrainConfig(steps=300, out_dir="runs/x"))

`train_data` is a map-style dataset of raw samples (`len` + `[i]`; each a dict with `messages`
and `image`/`images`); its order is a pure function of (seed, position), so `resume_from`
continues an interrupted run exactly. `val_data` is any iterable of raw samples; the first
`eval_batches * batch_size` of them are the validation set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from tilevlm import optim, trainstate
from tilevlm.data.collate import SkipBadSamples, VLMCollator, to_model_inputs
from tilevlm.data.sampler import ResumableBatchSampler
from tilevlm.inference import resolve_device
from tilevlm.trainconfig import TrainConfig

log = logging.getLogger(__name__)

@dataclass
class TrainState:
    """What a checkpoint must remember besides tensors."""

    step: int = 0  # optimizer steps done
    position: int = 0  # samples drawn from the training stream (bad ones included)
    skipped_samples: int = 0
    nonfinite_steps: int = 0


@dataclass
class TrainResult:
    step: int
    loss: float | None  # the last step's training loss
    val: dict[str, Any] | None  # the last validation metrics
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool
    skipped_samples: int
    nonfinite_steps: int


@dataclass
class _Run:
    """Everything the loop's small steps share."""

    cfg: TrainConfig
    model: nn.Module
    processor: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    bf16: bool
    state: TrainState
    val_samples: list[dict[str, Any]]
    metrics: "MetricsLog"
    params: list[nn.Parameter] = field(default_factory=list)
    batches: Iterator[dict[str, Any] | None] | None = None
    last_loss: float | None = None
    last_val: dict[str, Any] | None = None
    last_checkpoint: Path | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------- entry point
def train(model: nn.Module, processor: Any, train_data: Sequence[dict[str, Any]],
          val_data: Iterable[dict[str, Any]] | None = None, config: TrainConfig | None = None,
          resume_from: str | Path | None = None) -> TrainResult:
    """Train `model` on `train_data`; see the module docstring. Ctrl-C saves and returns."""
    cfg = config or TrainConfig()
    run = _setup(model, processor, train_data, val_data, cfg, resume_from)
    interrupted = False
    try:
        with _SigintFlag() as stop:
            interrupted = _loop(run, stop)
            if not interrupted:
                _finish(run)
    finally:
        run.batches = None  # shuts DataLoader workers down
        run.metrics.close()
    return TrainResult(run.state.step, run.last_loss, run.last_val, run.last_checkpoint,
                       interrupted, run.state.skipped_samples, run.state.nonfinite_steps)


def _loop(run: _Run, stop: "_SigintFlag") -> bool:
    """Steps until done; True when stopped by Ctrl-C (after saving a checkpoint)."""
    cfg = run.cfg
    with _progress_bar(cfg, run.state.step) as bar:
        while run.state.step < cfg.steps:
            _train_step(run, bar)
            if stop.requested:
                log.info("interrupted at step %d: saving a checkpoint", run.state.step)
                _save(run)
                return True
            _periodic(run)
    return False


def _finish(run: _Run) -> None:
    """Final validation and checkpoint."""
    if run.val_samples:
        _validate(run)
    _save(run)


def _periodic(run: _Run) -> None:
    """Validation and checkpoints every N steps (those of the last step are `_finish`'s)."""
    step, cfg = run.state.step, run.cfg
    if run.val_samples and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        _validate(run)
    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
        _save(run)


# ---------------------------------------------------------------- setup
def _setup(model: nn.Module, processor: Any, train_data: Sequence[dict[str, Any]],
           val_data: Iterable[dict[str, Any]] | None, cfg: TrainConfig,
           resume_from: str | Path | None) -> _Run:
    _check_map_style(train_data)
    _seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = optim.build_optimizer(model, cfg.part_lrs, cfg.weight_decay,
                                      (cfg.adam_beta1, cfg.adam_beta2), device.type)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainstate.remove_stale_tmp(out_dir)
    val_samples = list(itertools.islice(val_data, cfg.eval_batches * cfg.batch_size)) \
        if val_data is not None else []
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported())
    run = _Run(cfg, model, processor, optimizer, device, bf16, TrainState(), val_samples,
               MetricsLog(out_dir), params=[p for p in model.parameters() if p.requires_grad])
    if resume_from is not None:
        _resume(run, Path(resume_from))
    run.batches = _batches(run, train_data)
    log.info("training %s parameters (%s frozen) on %s%s for %d steps from step %d",
             f"{sum(p.numel() for p in run.params):,}",
             f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,}",
             device, " with bf16 autocast" if bf16 else "", cfg.steps, run.state.step)
    return run


def _check_map_style(data: Any) -> None:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError("train_data must be a map-style dataset (len() and [index]) so its order "
                         f"can be resumed; got {type(data).__name__}")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(run: _Run, train_data: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any] | None]:
    """Endless collated batches starting at the run's data position."""
    cfg = run.cfg
    sampler = ResumableBatchSampler(len(train_data), cfg.batch_size, cfg.seed,
                                    start=run.state.position)
    loader = torch.utils.data.DataLoader(
        SkipBadSamples(train_data), batch_sampler=sampler, collate_fn=VLMCollator(run.processor),
        num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_ignore_sigint)
    return iter(loader)


def _ignore_sigint(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume(run: _Run, path: Path) -> None:
    ckpt = trainstate.find_latest(path)
    if ckpt is None:
        raise ValueError(f"{path}: no complete checkpoint to resume from")
    trainstate.load_model_weights(run.model, ckpt)
    saved = trainstate.load_training_files(ckpt, run.optimizer)
    run.state = TrainState(**saved["state"])
    _warn_config_changes(saved.get("train_config", {}), run.cfg)
    log.info("resumed from %s at step %d (data position %d)", ckpt, run.state.step,
             run.state.position)


def _warn_config_changes(saved: dict[str, Any], cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "seed", "steps", "warmup_steps"):
        if name in saved and saved[name] != getattr(cfg, name):
            log.warning("resuming with %s=%s (the checkpoint used %s): the run will not match an "
                        "uninterrupted one", name, getattr(cfg, name), saved[name])


# ---------------------------------------------------------------- one step
def _train_step(run: _Run, bar: Any) -> None:
    cfg, state = run.cfg, run.state
    start = time.perf_counter()
    lr = optim.set_lr(run.optimizer, optim.lr_factor(state.step, cfg.warmup_steps, cfg.steps,
                                                     cfg.min_lr_ratio))
    losses, samples = [], 0
    for _ in range(cfg.grad_accum):
        batch = _next_batch(run)
        losses.append(_forward_backward(run, batch))
        samples += batch["input_ids"].shape[0]
    loss = torch.stack(losses).mean()
    grad_norm = nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or math.inf)
    loss_value, norm_value = loss.item(), grad_norm.item()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        run.optimizer.step()
    else:
        _nonfinite(run, loss_value, norm_value)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    run.last_loss = loss_value
    _log_step(run, bar, loss_value, norm_value, lr, samples / (time.perf_counter() - start))


def _next_batch(run: _Run) -> dict[str, Any]:
    """The next non-empty batch; advances the data position and the skipped-sample count."""
    while True:
        batch = next(run.batches)
        run.state.position += run.cfg.batch_size
        if batch is None:  # every sample of it was bad
            run.state.skipped_samples += run.cfg.batch_size
            continue
        run.state.skipped_samples += batch.pop("n_skipped", 0)
        return batch


def _forward_backward(run: _Run, batch: dict[str, Any]) -> torch.Tensor:
    inputs = to_model_inputs(batch, run.device)
    with run.autocast():
        loss = run.model(**inputs).loss
    (loss / run.cfg.grad_accum).backward()
    return loss.detach().float()


def _nonfinite(run: _Run, loss: float, grad_norm: float) -> None:
    step = run.state.step + 1
    what = f"non-finite loss ({loss})" if not math.isfinite(loss) else \
        f"non-finite gradient norm ({grad_norm})"
    if run.cfg.on_nonfinite == "stop":
        raise ValueError(f"{what} at step {step}; set on_nonfinite='skip' to drop such steps")
    run.state.nonfinite_steps += 1
    log.warning("%s at step %d: update skipped (%d so far)", what, step,
                run.state.nonfinite_steps)


def _log_step(run: _Run, bar: Any, loss: float, grad_norm: float, lr: float,
              samples_per_s: float) -> None:
    state = run.state
    run.metrics.write({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": samples_per_s, "skipped_samples": state.skipped_samples,
                       "nonfinite_steps": state.nonfinite_steps})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}", refresh=False)
    bar.update(1)


# ---------------------------------------------------------------- validation, checkpoints
def _validate(run: _Run) -> None:
    from tilevlm.evaluate import evaluate

    report = evaluate(run.model, run.processor, run.val_samples, batch_size=run.cfg.batch_size,
                      max_new_tokens=run.cfg.eval_max_new_tokens, autocast=run.autocast)
    run.last_val = {"val_loss": report.loss, "val_accuracy": report.accuracy}
    run.metrics.write({"step": run.state.step, **run.last_val})
    log.info("step %d: validation loss %.4f, exact match %.1f%% (%d samples)", run.state.step,
             report.loss, 100 * report.accuracy, report.n)


def _save(run: _Run) -> Path:
    from tilevlm.checkpoint import save_pretrained

    tokenizer = getattr(run.processor, "tokenizer", None)
    trainer_state = {"state": dataclasses.asdict(run.state), "train_config": run.cfg.to_dict(),
                     "schedule": {"kind": "warmup_cosine", "step": run.state.step,
                                  "warmup_steps": run.cfg.warmup_steps,
                                  "total_steps": run.cfg.steps,
                                  "min_lr_ratio": run.cfg.min_lr_ratio}}

    def write(directory: Path) -> None:
        save_pretrained(run.model, directory, tokenizer=tokenizer)
        trainstate.save_training_files(directory, run.optimizer, trainer_state)

    run.last_checkpoint = trainstate.atomic_checkpoint(run.cfg.out_dir, run.state.step, write)
    log.info("saved %s", run.last_checkpoint)
    return run.last_checkpoint


# ---------------------------------------------------------------- plumbing
class MetricsLog:
    """JSON lines in `out_dir/metrics.jsonl`, and TensorBoard scalars when tensorboard is
    installed."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(out_dir)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _progress_bar(cfg: TrainConfig, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, disable=not cfg.progress, desc="train",
                dynamic_ncols=True)


class _SigintFlag:
    """Within the block, the first Ctrl-C only sets `requested` (the loop saves and stops at the
    next step boundary); a second one raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        log.warning("Ctrl-C: stopping after this step (press again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
