"""The main job: train the `tiny` preset from scratch on the built-in tile-grid VQA data and show
that it reads single tiles through their grid tokens.

    result = run_demo(DemoConfig(out_dir="runs/demo"))

Steps: make the tokenizer from the synthetic corpus, build the model, train with a progress bar,
evaluate exact match on the held-out test split (per question type), print a few answers, save
the model (loadable by `tilevlm generate`), and draw one test image with its tiles, grid labels,
question and answer to a PNG. The recipe (sizes, learning rates, data mix, initialisation) and
what did and did not work is written up in docs/demo_recipe.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tilevlm.config import VLMConfig, preset
from tilevlm.data.sources import synthetic_spec, synthetic_tokenizer
from tilevlm.data.synthetic import SyntheticVQA
from tilevlm.evaluation.answering import greedy_answers
from tilevlm.evaluation.quiz import evaluate
from tilevlm.evaluation.report import write_report
from tilevlm.files import make_output_dir, read_json_object
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.image import ImageTransform
from tilevlm.preprocessing.processor import Processor
from tilevlm.preprocessing.tile_figure import draw_tiles
from tilevlm.training.final_model import write_final_model
from tilevlm.training.loop import train
from tilevlm.training.run_lock import lock_run_dir
from tilevlm.training.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The recipe (docs/demo_recipe.md says why each value): one learning rate for all parts,
    no weight decay, short warmup, a training mix rich in per-tile questions and 1x1 images,
    shapes at least 65% of the tile, and a projector initialised at the text embeddings' scale."""

    out_dir: str = "runs/demo"
    steps: int = 4500
    batch_size: int = 32
    lr: float = 1e-3  # vision, projector and decoder alike; 2e-3 and up stalls
    warmup_steps: int = 30
    qtype_weights: tuple[float, ...] = (0.35, 0.35, 0.05, 0.05, 0.2)  # colour shape rows cols where
    # the mix from step `later_from_step` on (None: the same all run); see docs/demo_recipe.md
    later_qtype_weights: tuple[float, ...] | None = None
    later_from_step: int = 0
    single_tile_frac: float = 0.35  # 1x1 images train the vision encoder without a grid lookup
    min_shape_frac: float = 0.65  # shape size, as a fraction of the tile side (up to 0.8)
    # auxiliary training questions (SyntheticSpec.extra_qtypes); the test split asks the 5 types
    extra_qtypes: tuple[tuple[str, float], ...] = ()
    pair_grid_frac: float = 0.0  # share of 1x2 / 2x1 training images
    projector_init_scale: float = 1 / 16
    train_size: int = 1_000_000  # indices of the train split; a run sees steps * batch_size
    val_size: int = 128
    test_size: int = 500
    eval_every: int = 1500
    seed: int = 0
    show: int = 6  # test questions printed with the model's answers
    progress: bool = True
    threads: int | None = None  # None: torch's default
    model_overrides: dict[str, Any] = field(default_factory=dict)  # VLMConfig fields over `tiny`

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr_vision=self.lr,
                           lr_projector=self.lr, lr_decoder=self.lr, weight_decay=0.0,
                           warmup_steps=min(self.warmup_steps, self.steps),  # a short demo
                           grad_clip=1.0,
                           eval_every=self.eval_every,
                           eval_batches=max(1, self.val_size // self.batch_size),
                           eval_max_new_tokens=8, save_every=0,
                           out_dir=str(Path(self.out_dir) / "train"), seed=self.seed,
                           dtype="fp32", device="cpu", progress=self.progress,
                           shuffle=False)  # index order: the mix changes at later_from_step


# `tilevlm demo --long`: colour and shape are learned by step ~3000; from then on most questions
# are `where`, which then leaves its prior (docs/demo_recipe.md, sixth session). About 2.7x the
# default's time.
LONG_RECIPE: dict[str, Any] = dict(steps=12000, later_qtype_weights=(0.15, 0.15, 0.05, 0.05, 0.6),
                                   later_from_step=3000)


@dataclass
class DemoResult:
    accuracy: float
    per_qtype: dict[str, dict[str, float]]
    seconds: float
    model_dir: Path
    figure: Path
    report: Path
    examples: list[dict[str, str]]


def build_model(cfg: DemoConfig) -> tuple[VisionLanguageModel, Processor]:
    """The tiny model (fresh weights, seeded) and its processor with the synthetic BPE."""
    tokenizer, model_cfg = synthetic_tokenizer(preset("tiny", **cfg.model_overrides))
    torch.manual_seed(cfg.seed)
    model = VisionLanguageModel(model_cfg)
    with torch.no_grad():
        # Projected tiles start ~16x larger than the token embeddings (std 0.02); at the same
        # scale the decoder learns to look tiles up several times faster (docs/demo_recipe.md).
        model.projector.proj.weight.mul_(cfg.projector_init_scale)
    return model, Processor(model_cfg, tokenizer)


def demo_data(model_cfg: VLMConfig, cfg: DemoConfig) -> dict[str, SyntheticVQA]:
    """Train / validation / test splits (disjoint seeds per split, see data/synthetic.py)."""
    base = dataclasses.replace(synthetic_spec(model_cfg, seed=cfg.seed),
                               min_shape_frac=cfg.min_shape_frac)
    train_spec = dataclasses.replace(base, qtype_weights=cfg.qtype_weights,
                                     single_tile_frac=cfg.single_tile_frac,
                                     extra_qtypes=tuple(map(tuple, cfg.extra_qtypes)),
                                     pair_grid_frac=cfg.pair_grid_frac,
                                     later_qtype_weights=cfg.later_qtype_weights,
                                     later_from=cfg.later_from_step * cfg.batch_size)
    return {"train": SyntheticVQA("train", cfg.train_size, train_spec),
            "val": SyntheticVQA("validation", cfg.val_size, base),
            "test": SyntheticVQA("test", cfg.test_size, base)}


def run_demo(cfg: DemoConfig) -> DemoResult:

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = make_output_dir(Path(cfg.out_dir), "demo's output directory (--out)")
    with lock_run_dir(out):  # one demo at a time in a folder; a rerun replaces the last one
        return _run_demo(cfg, out)


def _run_demo(cfg: DemoConfig, out: Path) -> DemoResult:
    start = time.perf_counter()
    model, processor = build_model(cfg)
    data = demo_data(model.cfg, cfg)
    log.info("demo: %s parameters, %d steps of batch %d on %d CPU threads; outputs in %s",
             f"{model.num_parameters():,}", cfg.steps, cfg.batch_size, torch.get_num_threads(), out)
    result = train(model, processor, data["train"], data["val"], cfg.train_config(),
                   overwrite=True)
    if result.interrupted:
        raise KeyboardInterrupt
    train_seconds = time.perf_counter() - start
    log.info("evaluating on %d held-out test questions ...", len(data["test"]))
    report = evaluate(model, processor, data["test"], batch_size=64, max_new_tokens=8,
                      n_examples=cfg.show)
    model_dir = write_final_model(model, processor.tokenizer, out)
    report_path = write_report(report, out / "report.json")
    seconds = time.perf_counter() - start
    _add_timing(report_path, train_seconds, seconds, cfg)
    figure = draw_example(model, processor, data["test"], out / "example.png")
    return DemoResult(report.score, report.per_category, seconds, model_dir, figure, report_path,
                      report.examples)


def _add_timing(path: Path, train_seconds: float, seconds: float, cfg: DemoConfig) -> None:
    data = read_json_object(path)
    data.update(train_seconds=round(train_seconds, 1), total_seconds=round(seconds, 1),
                threads=torch.get_num_threads(), demo_config=dataclasses.asdict(cfg))
    path.write_text(json.dumps(data, indent=2) + "\n")


def _pick_example(test: SyntheticVQA) -> dict[str, Any]:
    """The first test sample about one tile of the largest grid: the figure shows the point."""
    best = None
    for i in range(min(len(test), 200)):
        s = test[i]
        if s["qtype"] in ("colour", "shape") and (best is None or
                                                  s["grid"][0] * s["grid"][1] > best["grid"][0] * best["grid"][1]):
            best = s
    return best or test[0]


def draw_example(model: VisionLanguageModel, processor: Processor, test: SyntheticVQA,
                 path: Path) -> Path:
    """One test image with its tiles and grid labels, the question, the model's answer."""
    sample = _pick_example(test)
    answer = greedy_answers(model, processor, [sample["messages"][:-1]], [[sample["image"]]], 8)[0]
    resized, thumb, grid = ImageTransform(model.cfg).resize(sample["image"])
    verdict = "right" if answer.strip() == sample["answer"] else f"wrong; expected {sample['answer']}"
    title = f"Q: {sample['question']}\nA: {answer} ({verdict})"
    # Small tiles (32 px) are scaled up, pixels kept sharp, so labels and text stay readable.
    scale = max(1, 480 // (resized.width + (thumb.width if thumb is not None else 0)))
    resized, thumb = _upscale(resized, scale), _upscale(thumb, scale)
    figure = draw_tiles(resized, grid, model.cfg.vit_img_size * scale, thumb, title=title)
    figure.save(path)
    return path


def _upscale(img: Any, scale: int) -> Any:
    if img is None or scale == 1:
        return img
    from PIL import Image

    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
