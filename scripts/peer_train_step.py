"""nanoVLM's training step on the workload of `tilevlm bench --parts train`, for side-by-side runs.

    python scripts/peer_train_step.py --nanovlm DIR [--dtype fp32|bf16] [--repeats 3] [--warmup 1]

DIR is a nanoVLM checkout (e.g. `git -C MIRROR archive HEAD | tar -x -C DIR`). Same dims as
tilevlm's `original_small` (SigLIP-B/16 at 224, SmolLM2-135M, 49 tokens a tile), random weights,
the bench's batch (4 samples, a 2x2 + global split each, 24 prompt and 64 answer tokens, the same
token ids), nanoVLM's own forward (the LM head over every position) and its optimizer (plain
AdamW, as in its train.py), bf16 through autocast as its train.py does. nanoVLM's tokenizer comes
from the hub, so a stand-in holding only the image token id is used (the model reads nothing
else from it). Prints the median step time and the process's peak RSS; run it in its own process,
alternating with `tilevlm bench --parts train`, so that load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
import types

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanovlm", required=True, help="a nanoVLM checkout (its repo root)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tilevlm.bench.bench_config import BenchConfig
    from tilevlm.bench.workload import synthetic_batch
    from tilevlm.model.vlm import VisionLanguageModel as TileVLM

    bc = BenchConfig(train_batch=4)
    ours = bc.model_config()
    torch.manual_seed(bc.seed)
    batch = synthetic_batch(TileVLM(ours), bc.train_batch, bc.prompt_tokens, bc.answer_tokens,
                            torch.device("cpu"), bc.seed)  # the bench's ids and tiles, exactly
    image_id = ours.special_token_ids()["<|image|>"]

    sys.path.insert(0, args.nanovlm)
    # nanoVLM's data.processors needs torchvision and the hub; the model only asks it for the
    # tokenizer, so that one module is replaced by a stand-in.
    stand_in = types.ModuleType("data.processors")
    stand_in.get_tokenizer = lambda *a, **k: types.SimpleNamespace(image_token_id=image_id)
    sys.modules["data.processors"] = stand_in
    import models.vision_language_model as nv
    from models.config import VLMConfig

    cfg = VLMConfig(vit_img_size=ours.vit_img_size, vit_patch_size=ours.vit_patch_size,
                    vit_hidden_dim=ours.vit_hidden_dim, vit_inter_dim=ours.vit_inter_dim,
                    vit_n_heads=ours.vit_n_heads, vit_n_blocks=ours.vit_n_blocks,
                    lm_hidden_dim=ours.lm_hidden_dim, lm_inter_dim=ours.lm_inter_dim,
                    lm_n_heads=ours.lm_n_heads, lm_n_kv_heads=ours.lm_n_kv_heads,
                    lm_n_blocks=ours.lm_n_blocks, lm_base_vocab_size=ours.lm_base_vocab_size,
                    lm_vocab_size=ours.lm_vocab_size, lm_re_base=int(ours.lm_re_base),
                    lm_tie_weights=ours.lm_tie_weights, mp_pixel_shuffle_factor=ours.mp_pixel_shuffle_factor,
                    mp_image_token_length=ours.mp_image_token_length, max_img_size=ours.max_img_size,
                    vlm_load_backbone_weights=False)
    model = nv.VisionLanguageModel(cfg, load_backbone=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            _, loss = model(batch["input_ids"], batch["pixel_values"],
                            attention_mask=batch["attention_mask"], targets=batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"nanoVLM training step: {statistics.median(times):.3f} s/step (runs "
          f"{min(times):.3f}-{max(times):.3f}), {args.dtype}, batch {bc.train_batch}, "
          f"seq {batch['input_ids'].shape[1]}, {params:,} params, peak {rss:.0f} MiB "
          f"(process peak RSS), {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
