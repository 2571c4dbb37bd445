"""What the weight formats cost in accuracy, against bf16: logit differences, greedy agreement,
and perplexity on a fixed text. Offline: the text, its tokenizer and the model are made here.

    python scripts/quant_accuracy.py [--steps 600] [--threads 2] [--json out.json]

1. The text: sentences written by a seeded generator (tiles, colours, shapes, counts, simple
   sums), a training part and a held-out part from different seeds. Real prose would be better;
   no download is allowed, and a model that has learned *this* text is sure of many tokens, so
   quantisation errors show as they do on a trained model (a random model's flat logits hide them).
2. The model: a decoder with SmolLM2-135M's widths (576 hidden, 1536 MLP, 9 query / 3 KV heads of
   64: the shapes every int4 group sees in SmolVLM) and 4 blocks, trained from scratch on the
   training part (fp32 weights, bf16 autocast, AdamW) with a byte-level BPE of 2,048 tokens trained on it.
3. Every weight format (fp32, bf16, int8, int4 in groups of 32 and of 64) on the held-out part,
   teacher-forced: perplexity, the largest and mean |logit - bf16 logit|, the share of positions
   whose top-1 token equals bf16's; and free greedy generation from held-out prompts: the share of
   generated tokens equal to bf16's (up to the first difference, and in all).
4. The same logit and agreement figures on the random smolvlm_256m decoder (the bench's weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch
import torch.nn.functional as F

from tilevlm.bench.bench_config import BenchConfig
from tilevlm.config import preset
from tilevlm.inference.generation import generate
from tilevlm.inference.quantize import inference_weights
from tilevlm.model.vlm import VisionLanguageModel

COLOURS = "red green blue yellow purple orange black white".split()
SHAPES = "circle square triangle star heart diamond cross ring".split()
VERBS = "sits lies stands rests waits".split()
FORMATS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("int8", None),
           "int4 g32": ("int4", 32), "int4 g64": ("int4", 64)}


# ----------------------------------------------------------------------------- the text

def sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    c, s = rng.choice(COLOURS), rng.choice(SHAPES)
    r, k = rng.randint(1, 6), rng.randint(1, 6)
    if kind == 0:
        return f"The {c} {s} {rng.choice(VERBS)} in row {r}, column {k}."
    if kind == 1:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        n = rng.randint(2, 9)
        return f"There are {n} {c} {s}s on the grid of {r} by {k} tiles."
    return f"Where is the {c} {s}? It is in row {r}, column {k}, next to a {rng.choice(SHAPES)}."


def text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    return " ".join(sentence(rng) for _ in range(sentences))


def tokenizer(corpus: str, vocab: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus[i:i + 2000] for i in range(0, len(corpus), 2000)], trainer)
    return tok


# ----------------------------------------------------------------------------- the model

def trained_model(ids: torch.Tensor, vocab: int, steps: int, seq: int = 128, batch: int = 16,
                  seed: int = 0) -> VisionLanguageModel:
    cfg = preset("original_small", lm_n_blocks=4, lm_base_vocab_size=vocab, vit_n_blocks=1)
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    decoder = model.decoder
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([ids[o:o + seq + 1] for o in offsets.tolist()])  # (B, seq + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 matmuls
            hidden = decoder(decoder.embed(chunk[:, :-1]))
            logits = decoder.logits(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return model.eval()


# ----------------------------------------------------------------------------- the figures

@torch.no_grad()
def logits_of(model: VisionLanguageModel, ids: torch.Tensor, seq: int = 256) -> torch.Tensor:
    """Teacher-forced logits [N, V] (fp32) over `ids` in windows of `seq`."""
    decoder, out = model.decoder, []
    for start in range(0, len(ids) - 1, seq):
        chunk = ids[start:start + seq + 1]
        hidden = decoder(decoder.embed(chunk[None, :-1]))
        out.append(decoder.logits(hidden)[0].float())
    return torch.cat(out)  # (N, V)


def greedy(model: VisionLanguageModel, prompts: torch.Tensor, new: int) -> list[list[int]]:
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    return generate(model, batch, max_new_tokens=new, eos_token_ids=[]).tokens


def agreement(rows: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of tokens before each row's first difference, share of equal tokens)."""
    prefix = same = total = 0
    for a, b in zip(rows, ref):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix, same, total = prefix + first, same + sum(x == y for x, y in zip(a, b)), total + len(a)
    return prefix / total, same / total


def compare(base: VisionLanguageModel, ids: torch.Tensor | None, prompts: torch.Tensor,
            new: int) -> dict[str, dict[str, float]]:
    models = {name: inference_weights(copy.deepcopy(base), fmt, group or 32)
              for name, (fmt, group) in FORMATS.items()}
    ref_ids = ids if ids is not None else prompts.flatten()
    ref = logits_of(models["bf16"], ref_ids)
    ref_tokens = greedy(models["bf16"], prompts, new)
    out = {}
    for name, model in models.items():
        logits = logits_of(model, ref_ids)
        diff = (logits - ref).abs()
        row = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
               "logit_scale": ref.abs().max().item(),
               "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        if ids is not None:
            nll = F.cross_entropy(logits, ref_ids[1:len(logits) + 1])
            row["perplexity"] = math.exp(nll.item())
        row["greedy_prefix"], row["greedy_same"] = agreement(greedy(model, prompts, new), ref_tokens)
        out[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, held_out = text(0, 40_000), text(1, 1_500)
    tok = tokenizer(train)
    train_ids = torch.tensor(tok.encode(train).ids)
    test_ids = torch.tensor(tok.encode(held_out).ids)
    print(f"text: {len(train_ids):,} training tokens, {len(test_ids):,} held out, "
          f"vocabulary {tok.get_vocab_size()}", flush=True)
    model = trained_model(train_ids, tok.get_vocab_size(), args.steps)
    prompts = torch.stack([test_ids[i * 200:i * 200 + 24] for i in range(8)])  # 8 prompts
    results = {"trained": compare(model, test_ids, prompts, new=32)}
    print("random smolvlm_256m decoder (the bench's weights):", flush=True)
    torch.manual_seed(0)
    bench = VisionLanguageModel(BenchConfig(preset="smolvlm_256m").model_config()).eval()
    g = torch.Generator().manual_seed(0)
    random_prompts = torch.randint(3, 49152, (4, 32), generator=g)
    results["random_smolvlm_256m"] = compare(bench, None, random_prompts, new=32)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
