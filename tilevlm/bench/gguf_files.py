"""The bench's random weights as llama.cpp reads them: tilevlm's Idefics3 export (with a
stand-in tokenizer: the bench has none) converted by llama.cpp's own convert_hf_to_gguf.py,
q4_0 by its llama-quantize, so both systems hold the same tensors.

    files = write_gguf_files(model, llama_cpp, bin_dir, work_dir, threads)
    files.text["bf16"], files.mmproj["f16"], files.hf_dir, files.image

What the conversion works around, here and nowhere else: the stand-in tokenizer's
pre-tokenizer is unknown to the converter (`gguf_tools.py` writes "gpt-2", the split the
stand-in does). The export itself carries what else the converter reads (text_config's
architecture, the vision tower's image sizes).
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tilevlm.preprocessing.tokenizer import VLMTokenizer, load_tokenizer
from tilevlm.special_tokens import SMOLVLM_EOS_TOKEN, smolvlm_added_tokens
from tilevlm.weights.export_idefics3 import export_idefics3

log = logging.getLogger(__name__)

GGUF_TOOLS = Path(__file__).with_name("gguf_tools.py")
FIRST_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's ids 0, 1, 2
TEXT_TYPES = ("f32", "bf16", "q8_0")  # what the converter writes itself
QUANTIZED_TYPES = ("q4_0",)  # what llama-quantize makes from the f32 file
MMPROJ_TYPES = ("f32", "f16")
CONVERT_TIMEOUT_S = 1800


@dataclass
class GGUFFiles:
    hf_dir: Path  # the Idefics3 export both sides load
    image: Path  # the image both sides are timed on
    text: dict[str, Path] = field(default_factory=dict)  # by GGUF type: the language model
    mmproj: dict[str, Path] = field(default_factory=dict)  # by GGUF type: vision + projector


# ----------------------------------------------------------------------------- the tokenizer

def stand_in_tokenizer(cfg: Any, directory: Path) -> VLMTokenizer:
    """A byte-level BPE tokenizer shaped as SmolVLM's: exactly `lm_base_vocab_size` base tokens
    (SmolLM2's three first, the 256 bytes, then merges of two bytes, "\n\n" first: llama.cpp's
    Idefics3 image layout looks it up as one token), the idefics3 layout's
    tokens at SmolVLM's ids after them, reserved tokens up to `lm_vocab_size` with
    <end_of_utterance> last. Its merges mean nothing (the weights are random); llama.cpp and
    tilevlm read the same file, so both split a prompt alike."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_merges = cfg.lm_base_vocab_size - len(FIRST_TOKENS) - len(alphabet)
    if n_merges < 0:
        raise ValueError(f"a stand-in byte-level tokenizer needs lm_base_vocab_size >= "
                         f"{len(FIRST_TOKENS) + len(alphabet)}, got {cfg.lm_base_vocab_size}")
    vocab = {token: i for i, token in enumerate((*FIRST_TOKENS, *alphabet))}
    (newline, _), = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("\n")
    pairs = itertools.product(alphabet, repeat=2)
    rest = (pair for pair in pairs if pair != (newline, newline))
    merges = list(itertools.islice(itertools.chain([(newline, newline)], rest), n_merges))
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_added_tokens(cfg))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": FIRST_TOKENS[1],
              "pad_token": FIRST_TOKENS[2], "eos_token": _eos(cfg)}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(directory, grid_side=cfg.max_tiles_per_side,
                          layout=cfg.image_token_layout)


def _added_tokens(cfg: Any) -> list[str]:
    """The tokens after the base vocabulary, in id order."""
    return smolvlm_added_tokens(cfg.lm_base_vocab_size, cfg.lm_vocab_size - cfg.lm_base_vocab_size)


def _eos(cfg: Any) -> str:
    return SMOLVLM_EOS_TOKEN if SMOLVLM_EOS_TOKEN in _added_tokens(cfg) else FIRST_TOKENS[2]


# ----------------------------------------------------------------------------- the files

def write_export(model: Any, directory: Path) -> Path:
    """`model` (fp32) as an Idefics3 directory (`tilevlm export`'s) with the stand-in tokenizer."""
    tokenizer = stand_in_tokenizer(model.cfg, directory / "stand_in_tokenizer")
    return export_idefics3(model.float(), tokenizer, directory)


def write_image(path: Path, side: int, seed: int = 0) -> Path:
    """A square PNG of smooth noise, `side` pixels (the grid the bench's workload has)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(path)
    return path


def run_tool(command: list[str], what: str, timeout: float = CONVERT_TIMEOUT_S
             ) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; a failure is a ChildProcessError naming it and its last words."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)  # a token: any bytes
    except subprocess.TimeoutExpired:
        raise ChildProcessError(f"{what} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ChildProcessError(f"{what} failed (exit {done.returncode}): {last[:300]}")
    return done


def convert(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str, mmproj: bool = False) -> Path:
    """One GGUF file through llama.cpp's converter (`gguf_tools.py convert`)."""
    command = [sys.executable, str(GGUF_TOOLS), "convert", str(llama_cpp), str(hf_dir),
               "--outtype", outtype, "--outfile", str(out), *(["--mmproj"] if mmproj else [])]
    run_tool(command, f"llama.cpp's convert_hf_to_gguf.py ({out.name})")
    return out


def tensor_bytes(llama_cpp: Path, path: Path) -> dict[str, int]:
    """{tensor name: bytes} of a GGUF file, read by llama.cpp's gguf-py."""
    done = run_tool([sys.executable, str(GGUF_TOOLS), "sizes", str(llama_cpp), str(path)],
                    f"gguf-py's reader ({path.name})", timeout=300)
    return json.loads(done.stdout)


def write_gguf_files(model: Any, llama_cpp: Path, bin_dir: Path, work: Path, threads: int,
                     mmproj: bool = True) -> GGUFFiles:
    """Every file the comparison reads, under `work`."""
    files = GGUFFiles(hf_dir=write_export(model, work / "idefics3"),
                      image=write_image(work / "image.png", model.cfg.max_img_size // 2))
    for outtype in TEXT_TYPES:
        log.info("converting the language model to %s GGUF", outtype)
        files.text[outtype] = convert(llama_cpp, files.hf_dir, work / f"text-{outtype}.gguf",
                                      outtype)
    for qtype in QUANTIZED_TYPES:
        out = work / f"text-{qtype}.gguf"
        run_tool([str(bin_dir / "llama-quantize"), str(files.text["f32"]), str(out), qtype,
                  str(threads)], f"llama-quantize ({qtype})")
        files.text[qtype] = out
    for outtype in MMPROJ_TYPES if mmproj else ():
        log.info("converting the vision tower and projector to %s GGUF", outtype)
        files.mmproj[outtype] = convert(llama_cpp, files.hf_dir, work / f"mmproj-{outtype}.gguf",
                                        outtype, mmproj=True)
    return files
