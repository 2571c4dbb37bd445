"""Helpers shared by several test files (tests never import each other's modules).

Plain functions and constants; shared pytest fixtures are in conftest.py. Everything is made here
(no network, no files from outside the test's tmp directories).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tilevlm.cli import main
from tilevlm.config import VLMConfig, preset
from tilevlm.data.batch import TrainBatch, padding_fraction
from tilevlm.data.packing import PackedCollator, group_packs, pack_samples
from tilevlm.data.sample import Sample
from tilevlm.data.skips import SkipCounter
from tilevlm.inference.generation import decode_step
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.special_tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, grid_token
from tilevlm.training.train_config import TrainConfig

# Narrow widths over the `tiny` preset: trainer and evaluation tests run many steps quickly.
SMALL = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
             lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
             max_img_size=64)


def train_args(config: Path, out: Path, *extra: object) -> list[object]:
    """`tilevlm train` on synthetic data for one step of batch 2, no evaluation, no bar."""
    return ["train", "--config", config, "--data", "synthetic", "--out", out, "--steps", 1,
            "--batch-size", 2, "--train-size", 20, "--eval-batches", 0, "--no-progress", *extra]


REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the real CLI
def run_tilevlm(*args: Any, timeout: float = 120, cwd: Path | None = None
                ) -> subprocess.CompletedProcess:
    """`python -m tilevlm.cli ARGS` in a child process (this checkout first on the path), so
    stderr holds everything the user would see, log lines included; never waits forever."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "tilevlm.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(err: str, command: str, *parts: str) -> None:
    """`err` is exactly one line, `tilevlm COMMAND: error: ...`, holding every part."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tilevlm {command}: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def assert_refused(done: subprocess.CompletedProcess, command: str, *parts: str) -> None:
    """A child `tilevlm` run that refused its input: exit 2 and one line on stderr."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert_one_line_error(done.stderr, command, *parts)


# ----------------------------------------------------------------------------- images

def make_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, a few blobs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    img = np.stack([200 * u + 30, 180 * v + 40, 120 * (1 - u) * (1 - v) + 60], axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - 0.6 * blob) + 0.6 * blob * rng.uniform(0, 255, size=3)
    img = img + rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_fine_detail(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of pixel-sized detail (1-3 px stripes, a 2 px checkerboard, noise): what
    text and edges look like, where two resize methods differ most (a smooth photo hides it)."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = np.where(x % 3 == 0, 230, 20)
    img[..., 1] = np.where((x // 2 + y // 2) % 2 == 1, 220, 30)
    img[..., 2] = np.where(y % 5 < 2, 200, 40)
    noise = rng.integers(0, 40, size=img.shape, dtype=np.uint8)
    return Image.fromarray(img + noise)  # at most 230 + 39: no wrap-around


def png(width: int, height: int, seed: int = 0) -> bytes:
    """`make_photo(width, height, seed)` encoded as PNG."""
    buf = io.BytesIO()
    make_photo(width, height, seed).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- training runs

def make_model(config: VLMConfig, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel(config)


def quick(out_dir: Path, **overrides: Any) -> TrainConfig:
    """A 6-step TrainConfig (batch 4, high learning rates, no eval, no saves) for `train`."""
    values = dict(steps=6, batch_size=4, warmup_steps=2, lr_projector=2e-3, lr_vision=2e-3,
                  lr_decoder=2e-3, eval_every=0, save_every=0, progress=False,
                  out_dir=str(out_dir))
    return TrainConfig(**{**values, **overrides})


def interrupt_at_call(model: nn.Module, n: int) -> Any:
    """A forward hook raising SIGINT on the model's n-th call (a Ctrl-C during a step); returns
    its handle."""
    calls = []

    def interrupt(module: nn.Module, args: Any, output: Any) -> None:
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)

    return model.register_forward_hook(interrupt)


def train_cli(config: Path, tokenizer: Path, data: Path, out: Path, *extra: str) -> None:
    """`tilevlm train` on a dataset path with quick settings; `extra` flags win."""
    args = ["train", "--config", str(config), "--tokenizer", str(tokenizer), "--data", str(data),
            "--out", str(out), "--no-progress", "--warmup-steps", "1", "--lr-decoder", "2e-3",
            "--lr-vision", "2e-3", "--lr-projector", "2e-3", "--shuffle-block", "8",
            "--save-every", "0", *extra]
    assert main(args) == 0


def cli_env() -> dict[str, str]:
    """The environment for a `tilevlm` subprocess: this tree first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def cli(*argv: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `tilevlm` command in a subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "tilevlm.cli", *argv], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """A finished command's stderr from its first `tilevlm COMMAND: error:` line on (the log
    lines before it left out); there is never a traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines)
                  if line.startswith("tilevlm ") and ": error: " in line), len(lines))
    return lines[first:]


def records(out: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_records(out: Path) -> dict[int, dict]:
    """A run's training-step records, by step."""
    return {r["step"]: r for r in records(out) if "loss" in r}


def step_losses(out: Path) -> dict[int, float]:
    """A run's training loss, by step."""
    return {step: r["loss"] for step, r in step_records(out).items()}


# ----------------------------------------------------------------------------- dataset files

CORRUPT_ROW = 5  # its image bytes are not an image
LONG_ROW = 9  # more tokens than lm_max_length
TEXT_ROW = 11  # no image at all


def cauldron_rows(n: int = 24) -> list[dict]:
    """Cauldron-style rows with PNG bytes: one corrupt image, one too long, one text only."""
    rows = []
    for i in range(n):
        images = [{"bytes": png(24 + 8 * (i % 5), 32 + 8 * (i % 3), i), "path": None}]
        question = f"What is in picture {i}?"
        if i == CORRUPT_ROW:
            images = [{"bytes": b"not an image", "path": None}]
        if i == LONG_ROW:
            question = "Describe it. " * 400
        if i == TEXT_ROW:
            images = []
        rows.append({"images": images,
                     "texts": [{"user": question, "assistant": f"Picture {i} is red."}]})
    return rows


def write_parquet(directory: Path, n: int = 24) -> Path:
    """`cauldron_rows(n)` as directory/train.parquet, in row groups of 8 (skips without pyarrow)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.parquet"
    pq.write_table(pa.Table.from_pylist(cauldron_rows(n)), path, row_group_size=8)
    return path


# ----------------------------------------------------------------------------- foreign checkpoints
# Tiny random Hugging Face SigLIP / Llama models, saved for the converters. Every parameter is
# perturbed away from its init (biases non-zero, norms not exactly one), so a parity test cannot
# pass by accident on a zero bias or a unit norm.

LLAMA_VOCAB = 300
SIGLIP_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=4)
LLAMA_KW = dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=256, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)


def base_config() -> VLMConfig:
    """Non-backbone fields for HF builds in tests: the `tiny` preset (3x3 tiles of 32 px)."""
    return preset("tiny")


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def make_siglip(directory: Path, full: bool = False, seed: int = 0) -> nn.Module:
    """A saved SigLIP: `SiglipVisionModel`, or a full `SiglipModel` (text tower + vision_model.)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=100, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP_KW))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_KW, attn_implementation="sdpa"))
    _perturb(model, seed)
    model.eval().save_pretrained(directory)
    return model


def make_llama(directory: Path, tie: bool = True, sharded: bool = False, seed: int = 0) -> nn.Module:
    """A saved `LlamaForCausalLM` (GQA: 4 heads, 2 KV heads); sharded = two files + index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_KW, tie_word_embeddings=tie, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    _perturb(model, seed)
    model.eval().save_pretrained(directory)
    if sharded:
        _reshard(Path(directory))
    return model


def _reshard(directory: Path) -> None:
    """Rewrite model.safetensors as two shards with a model.safetensors.index.json."""
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: tensors[k].contiguous() for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


NANOVLM_CHAT_TEMPLATE = (  # nanoVLM's lm_chat_template (models/config.py)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}")


def byte_level_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A `tokenizers` byte-level BPE trained on `texts` (special tokens first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_base_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A base LLM's tokenizer directory as SmolLM2's is: byte-level BPE with exactly `vocab_size`
    tokens, <|endoftext|>, <|im_start|>, <|im_end|> first, none of tilevlm's tokens."""
    from tokenizers import AddedToken

    first = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level_bpe(["What colour is the shape? A red circle in row 2, column 3."] * 50,
                         vocab_size, first)
    filler = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<|unused_{i}|>", special=True) for i in range(filler)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "bos_token": None, "chat_template": NANOVLM_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def write_nanovlm(directory: Path, model: VisionLanguageModel) -> None:
    """`model` saved as a nanoVLM checkpoint directory (config.json + model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_nanovlm_config(model)))
    save_file(_nanovlm_state(model), directory / "model.safetensors")


def _nanovlm_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Our weights under nanoVLM's key names, written out by hand (independent of the maps)."""
    sd, cfg, out = model.state_dict(), model.cfg, {}
    out["vision_encoder.patch_embedding.conv.weight"] = sd["vision_encoder.patch_embed.weight"]
    out["vision_encoder.patch_embedding.conv.bias"] = sd["vision_encoder.patch_embed.bias"]
    out["vision_encoder.patch_embedding.position_embedding"] = sd["vision_encoder.pos_embed"][None]
    for part in ("weight", "bias"):
        out[f"vision_encoder.layer_norm.{part}"] = sd[f"vision_encoder.norm.{part}"]
        for i in range(cfg.vit_n_blocks):
            ours, theirs = f"vision_encoder.blocks.{i}.", f"vision_encoder.blocks.{i}."
            for a, b in (("ln1", "ln1"), ("ln2", "ln2"), ("attn.qkv", "attn.qkv_proj"),
                         ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{theirs}{b}.{part}"] = sd[f"{ours}{a}.{part}"]
    out["MP.proj.weight"] = sd["projector.proj.weight"]
    out["decoder.head.weight"] = sd["decoder.token_embedding.weight"]  # tied: save_model keeps `head`
    out["decoder.norm.weight"] = sd["decoder.norm.weight"]
    out["decoder.rotary_embd.inv_freq"] = torch.ones(4)
    hd = cfg.lm_head_dim
    for i in range(cfg.lm_n_blocks):
        p = f"decoder.blocks.{i}."
        q, k, v = sd[p + "attn.qkv.weight"].split(
            [cfg.lm_n_heads * hd, cfg.lm_n_kv_heads * hd, cfg.lm_n_kv_heads * hd])
        gate, up = sd[p + "mlp.gate_up.weight"].chunk(2)
        out.update({p + "attn.q_proj.weight": q, p + "attn.k_proj.weight": k,
                    p + "attn.v_proj.weight": v, p + "attn.out_proj.weight": sd[p + "attn.out.weight"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
                    p + "norm1.weight": sd[p + "norm1.weight"], p + "norm2.weight": sd[p + "norm2.weight"]})
    return {k: v.contiguous().clone() for k, v in out.items()}


def _nanovlm_config(model: VisionLanguageModel) -> dict:
    cfg = model.cfg
    extra = {"image_token": IMAGE_TOKEN, "global_image_token": GLOBAL_IMAGE_TOKEN}
    extra.update({f"r{r}c{c}": grid_token(r, c) for r in range(1, 9) for c in range(1, 9)})
    data = {k: v for k, v in cfg.to_dict().items()
            if k not in ("name", "grid_side", "image_mean", "image_std", "max_image_pixels",
                         "use_global_tile", "image_token_layout")}
    data.update(vit_dropout=0.0, vit_cls_flag=False, vit_model_type="google/siglip2-base-patch16-512",
                lm_dropout=0.0, lm_attn_scaling=1.0, lm_use_tokens=False, extra_token_amount=66,
                lm_model_type="HuggingFaceTB/SmolLM2-360M-Instruct", lm_chat_template="{{x}}",
                vlm_extra_tokens=extra, vlm_load_backbone_weights=True, hf_repo_name="nanoVLM")
    return data


# ----------------------------------------------------------------------------- compiled decoding

def decode_step_graph_breaks(model: nn.Module, batch_size: int = 1, max_len: int = 16) -> int:
    """How many graph breaks `torch._dynamo.explain` finds in one decode step of `model`."""
    device = next(model.parameters()).device
    model.decoder.setup_cache(batch_size, max_len)
    try:
        tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        positions = torch.full((batch_size,), 3, dtype=torch.long, device=device)
        mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        cache_position = torch.tensor([3], device=device)
        with torch.inference_mode():
            explanation = torch._dynamo.explain(decode_step)(model, tokens, positions,
                                                             cache_position, mask)
    finally:
        model.decoder.clear_cache()
    return explanation.graph_break_count


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM

IDEFICS3_TOKENS = ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                   "<global-img>", "<end_of_utterance>",
                   *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def write_idefics3_tokenizer(directory: Path, tokens: list[str] | None = None) -> Path:
    """A transformers tokenizer directory as SmolVLM's is: byte-level BPE (with "\\n\\n" merged)
    that already holds the Idefics3 tokens (`tokens`, default all of IDEFICS3_TOKENS)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    corpus = ["User: What is in row 2, column 3?\n\nAssistant: a red square.\n"] * 20
    tok = byte_level_bpe(corpus, 300, ["<|endoftext|>"])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (IDEFICS3_TOKENS if tokens is None else tokens)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<end_of_utterance>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return Path(directory)


def make_idefics3(directory: Path, tokenizer_dir: Path, patch: int = 16, tile: int = 64,
                  scale: int = 2, tie: bool = False, sharded: bool = False,
                  model_type: str = "idefics3", splitting: bool = True, seed: int = 0) -> nn.Module:
    """A saved tiny Idefics3ForConditionalGeneration (or SmolVLM...) with an Idefics3Processor
    (its Pillow image processor; longest edge 3 tiles) and the tokenizer, in one directory."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    eos, pad = tokenizer.convert_tokens_to_ids(["<end_of_utterance>", "<|endoftext|>"])
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                max_position_embeddings=1024, rope_theta=50000.0, tie_word_embeddings=tie,
                eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=tile, patch_size=patch)
    config_class, model_class = (
        (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration) if model_type == "smolvlm"
        else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration))
    torch.manual_seed(seed)
    model = model_class(config_class(
        vision_config=vision, text_config=text, scale_factor=scale, tie_word_embeddings=tie,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=pad))
    _perturb(model, seed)
    if tie:
        model.tie_weights()
    model.eval().save_pretrained(directory)
    if sharded:
        _reshard(Path(directory))
    idefics3_processor(tokenizer, tile, ((tile // patch) // scale) ** 2, splitting
                       ).save_pretrained(directory)
    return model


def idefics3_processor(tokenizer: Any, tile: int, image_seq_len: int, splitting: bool = True
                       ) -> Any:
    """transformers' Idefics3Processor with its Pillow image processor (no torchvision)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(size={"longest_edge": 3 * tile},
                                       max_image_size={"longest_edge": tile},
                                       do_image_splitting=splitting)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer,
                             image_seq_len=image_seq_len)


# ----------------------------------------------------------------------------- torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`tilevlm train ARGS` under torchrun with `nproc` CPU processes (gloo); asserts success."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    for _ in range(2):  # a port taken between free_port() and torchrun: try another one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "tilevlm.cli", "train", *args]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ----------------------------------------------------------------------------- tilevlm serve

@dataclass
class Server:
    """A running `tilevlm serve` child process, its base URL and its log file."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 30) -> tuple[int, str]:
        """SIGTERM (what a service manager sends), wait; (exit code, the whole log)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code, self.log.read_text()


def start_server(log: Path, *args: str, timeout: float = 120) -> Server:
    """`tilevlm serve --port 0 ARGS` (any free port; the log says which), once /health says
    ready; never waits forever."""
    import httpx

    out = log.open("w")
    process = subprocess.Popen([sys.executable, "-m", "tilevlm.cli", "serve", "--port", "0",
                                *args], env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tilevlm serve exited with {process.returncode}: "
                                 f"{log.read_text()[-3000:]}")
        found = re.search(r"listening on (http://\S+)", log.read_text())
        url = url or (found.group(1) if found else None)
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return Server(process, url, log)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"tilevlm serve not ready in {timeout} s: {log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------- packing passes
@dataclass
class PackingStats:
    """One pass over the data: `padding_fraction` = pad slots / all slots of the batches."""

    samples: int = 0
    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    slots: int = 0  # batch rows x padded length, summed over batches
    tiles: int = 0

    @property
    def padding_fraction(self) -> float:
        return padding_fraction(self.real_tokens, self.slots)

    def add(self, batch: TrainBatch) -> None:
        self.samples += batch.n_samples
        self.rows += batch.rows
        self.batches += 1
        self.real_tokens += batch.n_real_tokens
        self.slots += batch.slots
        self.tiles += sum(batch.info["n_tiles"])


class PackedBatches:
    """Packed micro-batches from measured samples (see `LengthFilter`); each iteration is one
    pass (epoch), whose figures are in `stats` and, once done, appended to `epoch_stats`."""

    def __init__(self, samples: Iterable[Sample], processor: Any, max_tokens: int | None = None,
                 max_tiles: int = 64, rows: int = 1, window: int = 64,
                 pad_to_budget: bool = False, skips: SkipCounter | None = None) -> None:
        if max_tiles < 1 or rows < 1 or window < 1:
            raise ValueError(f"max_tiles, rows and window must be >= 1, got {max_tiles}, "
                             f"{rows}, {window}")
        self.samples = samples
        self.max_tokens = max_tokens or processor.config.lm_max_length
        self.max_tiles, self.rows, self.window = max_tiles, rows, window
        self.skips = skips if skips is not None else getattr(samples, "skips", SkipCounter())
        self.collate = PackedCollator(processor, self.max_tokens if pad_to_budget else None,
                                      self.skips)
        self.stats = PackingStats()
        self.epoch_stats: list[PackingStats] = []

    def __iter__(self) -> Iterator[TrainBatch]:
        self.stats = PackingStats()
        packs = pack_samples(self.samples, self.max_tokens, self.max_tiles, self.window,
                             self.skips)
        for plan in group_packs(packs, self.rows, self.max_tiles):
            batch = self.collate(plan)
            if not batch.empty:
                self.stats.add(batch)
                yield batch
        self.epoch_stats.append(self.stats)
        logging.getLogger(__name__).info("packing pass: %d samples in %d rows, %d batches, %.1f%% padding, skipped %s",
                 self.stats.samples, self.stats.rows, self.stats.batches,
                 100 * self.stats.padding_fraction, self.skips.as_dict())


def text_part(text: str) -> dict:
    """A text part of a transformers-style message's content."""
    return {"type": "text", "text": text}


def as_tilevlm_chat(conversation: list[dict]) -> tuple[list[dict], list]:
    """A transformers-style conversation (content parts) as tilevlm's messages, "<image>" where
    each image part stands, and the images in order."""
    messages, images = [], []
    for message in conversation:
        text = ""
        for part in message["content"]:
            if part["type"] == "image":
                text += "<image>"
                images.append(part["image"])
            else:
                text += part["text"]
        messages.append({"role": message["role"], "content": text})
    return messages, images
