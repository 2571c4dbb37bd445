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
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tilevlm import preset
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.tokenizer import load_tokenizer
from tilevlm.special_tokens import (SMOLVLM_ADDED_TOKENS, SMOLVLM_GRID_SIDE,
                                    smolvlm_token_ids)
from tilevlm.weights.export_idefics3 import export_idefics3

BASE_VOCAB = 49152
# SmolVLM-256M-Instruct's chat_template (its chat_template.json).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
CORPUS = ["User: What is in the picture? Describe the image in detail.\n"
          "Assistant: A red square in row 2, column 3, beside a blue circle.\n"] * 50


def smolvlm_tokenizer(directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json shaped like SmolVLM's (ids, specials, template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # Plain (not special) filler tokens: a random model's tokens then decode to text, as a
    # real model's do, so a stream carries text from its first token on.
    filler = BASE_VOCAB - tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([AddedToken(f" w{i}", special=False, normalized=False) for i in range(filler)])
    by_id = {i: t for t, i in smolvlm_token_ids(BASE_VOCAB).items()}
    added = [by_id.get(BASE_VOCAB + k, f"<|reserved_{k}|>") for k in range(SMOLVLM_ADDED_TOKENS)]
    added[-1] = "<end_of_utterance>"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    assert tok.get_vocab_size(with_added_tokens=True) == BASE_VOCAB + SMOLVLM_ADDED_TOKENS
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<end_of_utterance>",
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
