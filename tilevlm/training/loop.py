"""The training loop: AdamW with per-part learning rates, warmup + cosine, gradient accumulation
weighted by tokens, bf16 autocast, periodic validation, atomic resumable checkpoints, clean
Ctrl-C, and the same loop under `torchrun` (DistributedDataParallel, see `tilevlm.training.distributed`,
or with `fsdp=True` FSDP2, parameters sharded per block: `tilevlm.training.fsdp`).

    result = train(model, processor, train_data, val_data, TrainConfig(steps=300, out_dir="runs/x"))

`train_data` is a map-style dataset of raw samples (`len` + `[i]`; each a dict with `messages`
and `image`/`images`), whose order is a pure function of (seed, position), or a `DatasetSpec`
(a dataset path, streamed; see `tilevlm.data.stream`). Either way `resume_from` continues an
interrupted run exactly (see `tilevlm.training.feed` for a different number of processes).
`val_data` is any iterable of raw samples; the first `eval_batches * batch_size` of them are the
validation set.

Under torchrun, `batch_size` is per process; the loss of a step is the sum of the token losses
of every micro-batch on every rank divided by their total number of tokens, so N processes with
batch_size B train exactly as one process with batch_size N*B. Every rank runs the same number
of steps (the data never runs out: it repeats), rank 0 logs metrics and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from tilevlm.data.batch import OTHER, TrainBatch, padding_fraction
from tilevlm.data.packing import INVALID
from tilevlm.data.skips import (
    IMAGE_ERROR,
    MALFORMED,
    PATH_ESCAPE,
    PLACEHOLDERS,
    TOO_LONG,
    TOO_MANY_TILES,
)
from tilevlm.device import resolve_device, resolve_dtype
from tilevlm.evaluation.quiz import evaluate
from tilevlm.files import make_output_dir
from tilevlm.inference.generation import kept_caches
from tilevlm.training import checkpoints, distributed, optim
from tilevlm.training.activation_checkpointing import checkpoint_blocks
from tilevlm.training.compile import check_backend, compile_blocks
from tilevlm.training.feed import Feed, make_feed, resume_feed
from tilevlm.training.final_model import write_adapter, write_final_model
from tilevlm.training.fsdp import (
    gather_model,
    gather_optimizer_state,
    grad_norm_value,
    shard_model,
    shard_optimizer_tensor,
    vision_run,
)
from tilevlm.training.lora import apply_lora
from tilevlm.training.master_weights import MasterWeights
from tilevlm.training.run_io import MetricsLog, NoMetrics, SigintFlag, progress_bar
from tilevlm.training.run_lock import clear_run
from tilevlm.training.train_config import TrainConfig
from tilevlm.weights.native import save_pretrained
from tilevlm.weights.run_folder import (
    FINAL_MODEL,
    TrainState,
    checkpoint_to_resume,
    train_state,
)

log = logging.getLogger(__name__)

# With on_nonfinite="skip", this many non-finite steps in a row stop the run (a NaN model or
# data that is all bad: nothing can be learned).
MAX_NONFINITE_IN_A_ROW = 20

# Skip reasons summed over ranks each step; anything else (e.g. a map-style sample that failed
# to read) is counted as OTHER.
SKIP_REASONS = (MALFORMED, PLACEHOLDERS, PATH_ESCAPE, IMAGE_ERROR, TOO_LONG, TOO_MANY_TILES,
                INVALID, OTHER)


@dataclass
class TrainResult:
    step: int
    loss: float | None  # the last step's training loss
    val: dict[str, Any] | None  # the last validation metrics
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool
    skipped_samples: int
    nonfinite_steps: int
    model_dir: Path | None = None  # OUT/model: the shareable model (`_write_model`)


@dataclass
class _Run:
    """Everything the loop's small steps share."""

    cfg: TrainConfig
    model: nn.Module  # the model itself: saved, validated (under FSDP: sharded in place)
    train_model: nn.Module  # what the step calls: the model, or DDP around it
    processor: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    bf16: bool
    state: TrainState
    val_samples: list[dict[str, Any]]  # rank 0's; empty on the others
    metrics: "MetricsLog | NoMetrics"
    feed: Feed
    params: list[nn.Parameter] = field(default_factory=list)
    batches: Iterator[TrainBatch] | None = None
    last_loss: float | None = None
    last_val: dict[str, Any] | None = None
    last_checkpoint: Path | None = None
    validates: bool = False  # the same on every rank: whether rank 0 has validation samples
    finite_steps: int = 0  # steps of this session whose update was applied
    nonfinite_in_a_row: int = 0
    master: "MasterWeights | None" = None  # bf16_mode "weights": the optimizer's fp32 copies

    @property
    def sharded(self) -> bool:
        """FSDP: the model's parameters are sharded over the ranks."""
        return self.cfg.fsdp and distributed.world_size() > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16 or self.master is not None:  # bf16 weights need no casting
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


@dataclass
class _StepFigures:
    """One step, summed over micro-batches (and, once reduced, over ranks)."""

    loss_sum: float = 0.0
    tokens: int = 0  # label tokens
    samples: int = 0
    rows: int = 0
    real_tokens: int = 0
    slots: int = 0
    drawn: int = 0  # samples drawn, skipped ones included
    stop: int = 0  # ranks asked to stop (Ctrl-C)
    skipped: Counter = field(default_factory=Counter)

    def count(self, batch: TrainBatch) -> None:
        """What `batch` drew and skipped; its samples and tokens unless it is empty."""
        for reason, n in batch.skipped.items():
            self.skipped[reason if reason in SKIP_REASONS else OTHER] += n
        self.drawn += batch.n_samples + batch.n_skipped
        if not batch.empty:
            self.samples += batch.n_samples
            self.rows += batch.rows
            self.real_tokens += batch.n_real_tokens
            self.slots += batch.slots

    def vector(self) -> list[float]:
        return [self.loss_sum, self.tokens, self.samples, self.rows, self.real_tokens,
                self.slots, self.drawn, self.stop, *(self.skipped[r] for r in SKIP_REASONS)]

    @classmethod
    def from_vector(cls, v: list[float]) -> "_StepFigures":
        n = len(SKIP_REASONS)
        counts = Counter({r: int(round(x)) for r, x in zip(SKIP_REASONS, v[-n:]) if x})
        return cls(v[0], *(int(round(x)) for x in v[1:-n]), skipped=counts)


# ---------------------------------------------------------------- entry point
def train(model: nn.Module, processor: Any, train_data: Sequence[dict[str, Any]] | Any,
          val_data: Iterable[dict[str, Any]] | None = None, config: TrainConfig | None = None,
          resume_from: str | Path | None = None, overwrite: bool = False) -> TrainResult:
    """Train `model` on `train_data`; see the module docstring. Ctrl-C saves and returns.
    `overwrite`: a previous run's files in the run folder are deleted first, once every
    option is checked (`run_lock.clear_run`); `run_lock.claim_run_dir` is what checks and
    locks the folder before any work (the command line calls it).

    Under torchrun, call it inside `distributed.process_group(device)` (the CLI does)."""
    cfg = config or TrainConfig()
    run = _setup(model, processor, train_data, val_data, cfg, resume_from, overwrite)
    interrupted = False
    try:
        with SigintFlag() as stop:
            interrupted = _loop(run, stop)
            if not interrupted:
                _finish(run)
            model_dir = _write_model(run)
    finally:
        run.batches = None  # shuts DataLoader workers down
        run.metrics.close()
    return TrainResult(run.state.step, run.last_loss, run.last_val, run.last_checkpoint,
                       interrupted, run.state.skipped_samples, run.state.nonfinite_steps, model_dir)


def _loop(run: _Run, stop: "SigintFlag") -> bool:
    """Steps until done; True when stopped by Ctrl-C (after saving a checkpoint)."""
    cfg = run.cfg
    with progress_bar(cfg, run.state.step) as bar:
        while run.state.step < cfg.steps:
            if _train_step(run, bar, stop):  # every rank learns of a Ctrl-C on any
                log.info("interrupted at step %d: saving a checkpoint", run.state.step)
                _save(run)
                return True
            _periodic(run)
    return False


def _finish(run: _Run) -> None:
    """Final checkpoint, then validation: the save comes before anything that can still fail.
    A run none of whose steps was finite ends in an error instead: it learned nothing."""
    ran = run.finite_steps + run.nonfinite_in_a_row
    if ran and not run.finite_steps:
        raise ValueError(f"every one of the {ran} steps of this run was non-finite (NaN or inf "
                         "loss or gradients; --on-nonfinite skip dropped them all): nothing was "
                         "learned and no model is written; check the data, the learning rates "
                         "and the model")
    _log_epoch(run, final=True)
    _save(run)
    if run.validates:
        _validate(run)


def _periodic(run: _Run) -> None:
    """Validation and checkpoints every N steps (those of the last step are `_finish`'s)."""
    step, cfg = run.state.step, run.cfg
    if run.validates and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        _validate(run)
    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
        _save(run)


# ---------------------------------------------------------------- setup
def _setup(model: nn.Module, processor: Any, train_data: Any,
           val_data: Iterable[dict[str, Any]] | None, cfg: TrainConfig,
           resume_from: str | Path | None, overwrite: bool = False) -> _Run:
    _check_options(cfg, model)
    rank, world = distributed.rank(), distributed.world_size()
    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and not sharded:
        log.info("--fsdp in one process: nothing to shard, training unsharded")
    feed = make_feed(train_data, processor, cfg, rank, world)
    _seed_everything(cfg.seed)
    device = distributed.rank_device(resolve_device(cfg.device))
    if not sharded:  # fully_shard moves each unit to the device as it shards it
        model.to(device)
    if cfg.lora:  # before compile and the optimizer: the adapters are parameters too
        apply_lora(model, cfg.lora_spec())
    if cfg.activation_checkpointing:  # before compile, as torchtitan: compile sees checkpoint
        checkpoint_blocks(model)
    if cfg.compile:  # per block (nn.Module.compile): same parameters, same state-dict keys
        compile_blocks(model, backend=cfg.compile)
    ckpt = checkpoint_to_resume(resume_from) if resume_from is not None else None
    if ckpt is not None:  # the weights before sharding: every rank reads the full tensors
        checkpoints.load_model_weights(model, ckpt)
    bf16 = resolve_dtype(cfg.dtype, device) == torch.bfloat16
    if sharded:
        _freeze_parts(model, cfg)  # which parameters train is fixed before sharding
        shard_model(model, device, bf16)
    master = MasterWeights(model) if bf16 and cfg.bf16_mode == "weights" else None
    # After sharding: the optimizer holds the sharded parameters (and their sharded state)
    optimizer = optim.build_optimizer(model, cfg.part_lrs, cfg.weight_decay,
                                      (cfg.adam_beta1, cfg.adam_beta2), device.type,
                                      over=master.groups if master else None)
    out_dir = make_output_dir(Path(cfg.out_dir), "run directory (--out)")
    if distributed.is_main():
        if overwrite:
            clear_run(out_dir)
        checkpoints.check_pointer(out_dir)
        checkpoints.remove_stale_tmp(out_dir)
    val_samples = list(itertools.islice(val_data, cfg.eval_batches * cfg.batch_size)) \
        if val_data is not None and distributed.is_main() else []
    metrics = MetricsLog(out_dir) if distributed.is_main() else NoMetrics()
    run = _Run(cfg, model, model, processor, optimizer, device, bf16, TrainState(), val_samples,
               metrics, feed, params=master.trainable() if master else
               [p for p in model.parameters() if p.requires_grad], master=master)
    # Every rank must take part in validating (a barrier; under FSDP the gathering), so every
    # rank must know whether rank 0 validates: only rank 0 reads the samples.
    run.validates = distributed.all_reduce_sum([len(val_samples)], device)[0] > 0
    if ckpt is not None:
        _resume(run, ckpt)
    if not sharded:
        run.train_model = distributed.parallelize(model, device)  # after the weights are final
    run.batches = feed.batches(pin_memory=device.type == "cuda")
    log.info("training %s parameters (%s frozen) on %s%s for %d steps from step %d%s",
             f"{sum(p.numel() for p in run.params):,}",  # a sharded one: its full size
             f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,}",
             device, (" with bf16 weights and fp32 master weights" if master else
                      " with bf16 autocast" + (" and bf16 FSDP parameters" if sharded else ""))
             if bf16 else "", cfg.steps, run.state.step,
             f" ({world} processes, global batch {cfg.batch_size * world * cfg.grad_accum}"
             f"{', FSDP' if sharded else ''})" if world > 1 else "")
    return run


def _freeze_parts(model: nn.Module, cfg: TrainConfig) -> None:
    """`requires_grad` as the optimizer will set it (lr 0 freezes a part), set before sharding:
    FSDP fixes at its first forward which parameters get gradients."""
    optim.param_groups(model, cfg.part_lrs, cfg.weight_decay)


def _check_options(cfg: TrainConfig, model: nn.Module) -> None:
    """What TrainConfig cannot check alone (it knows no model, imports no torch), checked before
    step 1 so that no option fails after the work is done."""
    limit = model.cfg.lm_max_position_embeddings
    if cfg.eval_max_new_tokens >= limit:
        raise ValueError(f"--eval-max-new-tokens {cfg.eval_max_new_tokens} leaves no room for a "
                         f"prompt in the model's {limit} positions")
    if cfg.compile:
        check_backend(cfg.compile)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resume(run: _Run, ckpt: Path) -> None:
    """Everything but the model weights (loaded before sharding) from `ckpt`."""
    place = None
    if run.sharded:
        place = shard_optimizer_tensor(run.optimizer)
    saved = checkpoints.load_training_files(ckpt, run.optimizer, place)
    run.state = train_state(saved["state"])
    resume_feed(run.feed, saved)
    _warn_config_changes(saved.get("train_config", {}),
                         saved.get("data_layout", {}).get("world_size", 1), run.cfg)
    log.info("resumed from %s at step %d (data position %s)", ckpt, run.state.step,
             run.feed.position())


def _warn_config_changes(saved: dict[str, Any], saved_world: int, cfg: TrainConfig) -> None:
    """Rank 0 warns about knobs that make the resumed run differ from an uninterrupted one
    (the global batch counts, not how it is split over processes)."""
    if not distributed.is_main():
        return
    now = {**cfg.to_dict(), "batch_size": cfg.batch_size * distributed.world_size()}
    before = {**saved, "batch_size": saved.get("batch_size", 0) * saved_world}
    for name in ("batch_size", "grad_accum", "seed", "steps", "warmup_steps", "pack",
                 "shuffle_block", "shuffle"):
        if name in saved and before[name] != now[name]:
            log.warning("resuming with %s%s=%s (the checkpoint used %s): the run will not match "
                        "an uninterrupted one", "global " if name == "batch_size" else "", name,
                        now[name], before[name])


# ---------------------------------------------------------------- one step
def _train_step(run: _Run, bar: Any, stop: "SigintFlag") -> bool:
    """One optimizer step on every rank; True when any rank asked to stop."""
    cfg, state = run.cfg, run.state
    start = time.perf_counter()
    lr = optim.set_lr(run.optimizer, optim.lr_factor(state.step, cfg.warmup_steps, cfg.steps,
                                                     cfg.min_lr_ratio))
    local = _StepFigures()
    batches = [_next_batch(run, local) for _ in range(cfg.grad_accum)]
    local.tokens = sum(b.label_count() for b in batches)
    total_tokens = max(1.0, distributed.all_reduce_sum([local.tokens], run.device)[0])
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # the gradient all-reduce runs once, on the last one
        with contextlib.nullcontext() if sync else distributed.no_sync(run.train_model):
            local.loss_sum += _forward_backward(run, batch, total_tokens)
    if run.master is not None:
        run.master.grads_to_masters()
    grad_norm = nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or math.inf)
    if run.sharded:
        grad_norm = grad_norm_value(grad_norm)  # the norm over every rank's shards
    local.stop = int(stop.requested)
    step = _StepFigures.from_vector(distributed.all_reduce_sum(local.vector(), run.device))
    loss_value, norm_value = step.loss_sum / total_tokens, grad_norm.item()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        run.optimizer.step()
        if run.master is not None:
            run.master.masters_to_weights()
        run.finite_steps += 1
        run.nonfinite_in_a_row = 0
    else:
        _nonfinite(run, loss_value, norm_value)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    run.last_loss = loss_value
    _account(run, step)
    _log_step(run, bar, step, loss_value, norm_value, lr, time.perf_counter() - start)
    return step.stop > 0


def _next_batch(run: _Run, figures: _StepFigures) -> TrainBatch:
    """The next non-empty micro-batch; counts what was drawn and skipped on the way."""
    while True:
        batch = next(run.batches)
        run.feed.consumed(batch)
        figures.count(batch)
        if not batch.empty:
            return batch


def _forward_backward(run: _Run, batch: TrainBatch, total_tokens: float) -> float:
    """Backward of this micro-batch's share of the step loss (its token-loss sum / all tokens
    of the step; times the world size, which DDP's and FSDP's gradient averaging divides out);
    returns its token-loss sum."""
    inputs = batch.inputs_on(run.device)
    n = batch.label_count()
    no_images = distributed.world_size() > 1 and inputs.get("pixel_values") is None
    with run.autocast():
        with _vision_run(run) if no_images and run.sharded else contextlib.nullcontext() as blank:
            # return_logits=False: the LM head only where labels count (a fraction of the rows)
            loss = run.train_model(**inputs, return_logits=False).loss  # mean over its n tokens
        if blank:  # FSDP: the vision units ran on a blank tile, as on the ranks with images
            loss = loss + blank[0].float().sum() * 0.0
        elif no_images:
            loss = loss + distributed.image_parts_touch(run.model)  # same value, zero grads
    (loss * (n * distributed.world_size() / total_tokens)).backward()
    return loss.detach().float().item() * n


def _vision_run(run: _Run) -> contextlib.AbstractContextManager:
    return vision_run(run.model)


def _nonfinite(run: _Run, loss: float, grad_norm: float) -> None:
    step = run.state.step + 1
    what = f"non-finite loss ({loss})" if not math.isfinite(loss) else \
        f"non-finite gradient norm ({grad_norm})"
    if run.cfg.on_nonfinite == "stop":
        raise ValueError(f"{what} at step {step}; set on_nonfinite='skip' to drop such steps")
    run.state.nonfinite_steps += 1
    run.nonfinite_in_a_row += 1
    if run.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise ValueError(f"{what} at step {step}: {run.nonfinite_in_a_row} steps in a row were "
                         "non-finite, so the run stops (nothing is learned, and the weights may "
                         "already be NaN); check the data, the learning rates and the model")
    log.warning("%s at step %d: update skipped (%d so far)", what, step,
                run.state.nonfinite_steps)


def _account(run: _Run, step: _StepFigures) -> None:
    """Running totals: data drawn, skipped samples by reason, this epoch's padding."""
    state = run.state
    state.position += step.drawn
    state.skipped_samples += sum(step.skipped.values())
    state.skipped = dict(Counter(state.skipped) + step.skipped)
    epoch = run.feed.epoch()  # rank 0's epoch decides what is logged
    if state.epoch and state.epoch["epoch"] != epoch:
        _log_epoch(run)
    if not state.epoch:
        state.epoch = {"epoch": epoch, "samples": 0, "rows": 0, "real_tokens": 0, "slots": 0}
    for key in ("samples", "rows", "real_tokens", "slots"):
        state.epoch[key] += getattr(step, key)


def _padding(figures: dict[str, Any]) -> float:
    return padding_fraction(figures.get("real_tokens", 0), figures.get("slots", 0))


def _log_epoch(run: _Run, final: bool = False) -> None:
    """The padding figures of the epoch just finished (a metrics record and a log line), or,
    `final`, a log line for the one in progress (its figures are in every step record)."""
    e = run.state.epoch
    if not e:
        return
    if not final:
        run.metrics.write({"step": run.state.step, "epoch": e["epoch"],
                           "epoch_padding_fraction": _padding(e), "epoch_samples": e["samples"],
                           "epoch_rows": e["rows"]})
        run.state.epoch = {}
    log.info("epoch %d%s: %d samples in %d rows, %.1f%% padding; skipped in all %s", e["epoch"],
             " (so far)" if final else "", e["samples"], e["rows"], 100 * _padding(e),
             run.state.skipped or "none")


def _log_step(run: _Run, bar: Any, step: _StepFigures, loss: float, grad_norm: float,
              lr: float, seconds: float) -> None:
    state = run.state
    padding = padding_fraction(step.real_tokens, step.slots)
    run.metrics.write({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": step.samples / seconds, "tokens": step.tokens,
                       "padding_fraction": padding, "epoch": run.feed.epoch(),
                       "epoch_padding_fraction": _padding(state.epoch),
                       "skipped_samples": state.skipped_samples, "skipped": state.skipped,
                       "nonfinite_steps": state.nonfinite_steps})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{step.samples / seconds:.1f}",
                    refresh=False)
    bar.update(1)
    _log_loss_line(run, bar, loss, lr, step.samples / seconds)


def _log_loss_line(run: _Run, bar: Any, loss: float, lr: float, samples_per_s: float) -> None:
    """Where no bar is drawn (--no-progress, a redirected log), a loss line every log_every steps
    and at the last one."""
    step, cfg = run.state.step, run.cfg
    if bar.disable and cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
        log.info("step %d/%d: loss %.4f, lr %.2e, %.1f samples/s", step, cfg.steps, loss, lr,
                 samples_per_s)


# ---------------------------------------------------------------- validation, checkpoints
def _validate(run: _Run) -> None:
    """On rank 0 (the others wait): its validation set is the whole one. Under FSDP on a
    plain copy of the model that the ranks gather for it (generation calls the decoder step by
    step, on one rank)."""
    model = _plain_model(run)
    if distributed.is_main():
        _validate_here(run, model.to(run.device) if run.sharded else model)
    del model
    distributed.barrier()


def _plain_model(run: _Run) -> nn.Module | None:
    """The model with every weight in place: itself, or under FSDP a gathered copy on rank 0's
    CPU (None on the other ranks). A collective under FSDP."""
    if not run.sharded:
        return run.model
    return gather_model(run.model)


def _validate_here(run: _Run, model: nn.Module) -> None:
    report = evaluate(model, run.processor, run.val_samples, batch_size=run.cfg.batch_size,
                      max_new_tokens=run.cfg.eval_max_new_tokens, autocast=run.autocast)
    kept_caches(model).clear()  # generation's KV caches: no memory of theirs while training
    run.last_val = {"val_loss": report.loss, "val_accuracy": report.score}
    run.metrics.write({"step": run.state.step, **run.last_val})
    log.info("step %d: validation loss %.4f, exact match %.1f%% (%d samples)", run.state.step,
             report.loss, 100 * report.score, report.n)


def _save(run: _Run) -> Path | None:
    """Every rank's data position is gathered; rank 0 writes; all wait for it."""
    run.state.data_positions = distributed.all_gather_object(run.feed.position())
    model, optimizer_state = _plain_model(run), None
    if run.sharded:
        optimizer_state = gather_optimizer_state(run.optimizer)
    if distributed.is_main():
        with _fp32_weights(run):
            _write_checkpoint(run, model, optimizer_state)
    del model, optimizer_state
    distributed.barrier()
    return run.last_checkpoint


def _fp32_weights(run: _Run) -> contextlib.AbstractContextManager:
    """What is saved holds the fp32 master weights, not their bf16 copies."""
    return run.master.fp32_weights() if run.master is not None else contextlib.nullcontext()


def _write_checkpoint(run: _Run, model: nn.Module,
                      optimizer_state: dict[str, Any] | None) -> Path:
    """The checkpoint of `model` (the run's own, or under FSDP the gathered copy) and the
    optimizer state (`optimizer_state`: the gathered one under FSDP)."""
    tokenizer = getattr(run.processor, "tokenizer", None)
    trainer_state = {"state": dataclasses.asdict(run.state), "train_config": run.cfg.to_dict(),
                     "data_layout": run.feed.layout(),
                     "schedule": {"kind": "warmup_cosine", "step": run.state.step,
                                  "warmup_steps": run.cfg.warmup_steps,
                                  "total_steps": run.cfg.steps,
                                  "min_lr_ratio": run.cfg.min_lr_ratio}}

    def write(directory: Path) -> None:
        save_pretrained(model, directory, tokenizer=tokenizer)
        checkpoints.save_training_files(directory, run.optimizer, trainer_state, optimizer_state)

    run.last_checkpoint = checkpoints.atomic_checkpoint(run.cfg.out_dir, run.state.step, write)
    log.info("saved %s", run.last_checkpoint)
    return run.last_checkpoint


def _write_model(run: _Run) -> Path:
    """OUT/model/ on rank 0 (weights, config, tokenizer; no optimizer): what a run shares."""
    path = Path(run.cfg.out_dir) / FINAL_MODEL
    model = _plain_model(run)
    if distributed.is_main():
        with _fp32_weights(run):
            write_final_model(model, getattr(run.processor, "tokenizer", None), run.cfg.out_dir)
            if run.cfg.lora:
                log.info("saved the adapter alone to %s",
                         write_adapter(run.model, run.cfg.out_dir))
        log.info("saved the model of step %d to %s (no optimizer state: the one to share)",
                 run.state.step, path)
    del model
    distributed.barrier()
    return path
