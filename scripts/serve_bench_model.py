"""The serving benchmark's large model: SmolVLM-256M-Instruct's architecture (SigLIP-B/16-512 +
SmolLM2-135M, Idefics3 layout, 64 tokens per tile) with random weights, written by
`tilevlm export --format idefics3`'s code as a transformers Idefics3 directory, with a
SmolVLM-shaped tokenizer (49,152 base tokens, SmolVLM's 128 added ones at SmolVLM's ids) and
SmolVLM's chat template. Both `tilevlm serve --model OUT` and `transformers serve OUT` read it,
so the two servers run the same weights, tokens and image rule.

    python scripts/serve_bench_model.py OUT [--max-img-size 1024]

--max-img-size 1024 (the default) gives every image 2x2 tiles + the global one (5 tiles, as
`tilevlm bench --preset smolvlm_256m` measures); SmolVLM's own 2048 gives 4x4 + 1 = 17 tiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tilevlm import preset
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.tokenizer import load_tokenizer
from tilevlm.special_tokens import (SMOLVLM_ADDED_TOKENS, SMOLVLM_EOS_TOKEN, SMOLVLM_GRID_SIDE,
                                    smolvlm_added_tokens)
from tilevlm.weights.export_idefics3 import export_idefics3

BASE_VOCAB = 49152
# SmolVLM-256M-Instruct's chat_template (its chat_template.json).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2


def base_bpe() -> Tokenizer:
    """A byte-level BPE with exactly BASE_VOCAB tokens, all of them plain text: the 256 byte
    symbols, then merges of printable ASCII into 2- and 3-character tokens. Every token a random
    model picks decodes to text (as a real model's do), and nothing about it is slower to
    encode or decode than a real vocabulary (49,152 added tokens would be, in transformers)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    printable = [byte_char[b] for b in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in sorted(alphabet):
        vocab[c] = len(vocab)
    merges = []
    pairs = [(a, b) for a in printable for b in printable]
    triples = ((a + b, c) for a, b in pairs for c in printable)
    for left, right in itertools.chain(pairs, triples):
        if len(vocab) == BASE_VOCAB:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tok


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def smolvlm_tokenizer(directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json shaped like SmolVLM's (ids, specials, template)."""
    tok = base_bpe()
    assert tok.get_vocab_size(with_added_tokens=True) == BASE_VOCAB
    added = smolvlm_added_tokens(BASE_VOCAB)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    assert tok.get_vocab_size(with_added_tokens=True) == BASE_VOCAB + SMOLVLM_ADDED_TOKENS
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SMOLVLM_EOS_TOKEN,
              "bos_token": "<|im_start|>", "pad_token": "<|im_end|>",
              "chat_template": SMOLVLM_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-img-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer_dir = args.out.with_name(args.out.name + "-tokenizer")
    smolvlm_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir, grid_side=SMOLVLM_GRID_SIDE, layout="idefics3")
    torch.manual_seed(args.seed)
    model = VisionLanguageModel(preset("smolvlm_256m", max_img_size=args.max_img_size)).eval()
    export_idefics3(model, tokenizer, args.out)
    (args.out / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE)  # for transformers' processor
    print(f"wrote {args.out}: {model.num_parameters():,} parameters, random weights")


if __name__ == "__main__":
    main()
