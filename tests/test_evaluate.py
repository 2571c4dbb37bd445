"""Evaluation: exact match with stub models that answer perfectly / wrongly, greedy decoding that
does not depend on batch padding, and the `train` + `eval` commands end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tilevlm import preset
from tilevlm.cli import main
from tilevlm.data.sources import named_dataset, synthetic_tokenizer
from tilevlm.evaluation.metrics import normalize_answer
from tilevlm.evaluation.answering import greedy_answers, split_prompt
from tilevlm.evaluation.quiz import evaluate
from tilevlm.model.vlm import VLMOutput, VisionLanguageModel, causal_lm_loss
from tilevlm.preprocessing.processor import Processor

from helpers import SMALL
from reference import full_forward_answers


@pytest.fixture(scope="module")
def setup():
    tokenizer, config = synthetic_tokenizer(preset("tiny", **SMALL))
    samples = list(named_dataset("synthetic", "test", 12, config))
    return config, Processor(config, tokenizer), samples


class ScriptedModel(nn.Module):
    """A stub that continues each known prompt with a scripted reply, then EOS: it looks its row
    (padding removed) up by prompt prefix and emits the next scripted token."""

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], vocab: int, eos: int) -> None:
        super().__init__()
        self.scripts, self.vocab, self.eos = scripts, vocab, eos
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the stub a device

    def _next(self, row: list[int]) -> int:
        for prompt, reply in self.scripts.items():
            if tuple(row[:len(prompt)]) == prompt:
                done = len(row) - len(prompt)
                return reply[done] if done < len(reply) else self.eos
        return self.eos

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # (B, T, V)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for b in range(input_ids.shape[0]):
            row = input_ids[b][mask[b].bool()].tolist()
            logits[b, len(row) - 1, self._next(row)] = 10.0
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return VLMOutput(logits=logits, loss=loss)


def scripted(processor: Processor, samples: list[dict], reply) -> tuple[ScriptedModel, list]:
    """The stub, and the samples it knows: those whose prompt ids are unique (the ids of two
    same-grid images are equal, so the stub could not tell them apart)."""
    tok = processor.tokenizer
    scripts, known = {}, []
    for s in samples:
        prompt, answer = split_prompt(s["messages"])
        ids = processor([prompt], [[s["image"]]], add_generation_prompt=True)["input_ids"][0]
        if tuple(ids.tolist()) not in scripts:
            scripts[tuple(ids.tolist())] = tok.encode(reply(answer))
            known.append(s)
    return ScriptedModel(scripts, tok.vocab_size, tok.eos_token_id), known


def test_perfect_model_scores_100_percent(setup):
    config, processor, samples = setup
    model, samples = scripted(processor, samples, reply=lambda answer: answer)
    assert len(samples) >= 8
    report = evaluate(model, processor, samples, batch_size=5, max_new_tokens=12,
                      answer_fn=full_forward_answers)
    assert report.n == len(samples) and report.score == 1.0
    assert report.per_category and all(v["score"] == 1.0 for v in report.per_category.values())
    assert sum(v["n"] for v in report.per_category.values()) == len(samples)
    assert report.examples[0]["prediction"] == report.examples[0]["reference"]


def test_wrong_model_scores_0_percent(setup):
    config, processor, samples = setup
    model, samples = scripted(processor, samples, reply=lambda answer: "banana " + answer)
    report = evaluate(model, processor, samples, batch_size=5, max_new_tokens=12,
                      answer_fn=full_forward_answers)
    assert report.score == 0.0
    assert all(v["score"] == 0.0 for v in report.per_category.values())


def test_greedy_answers_do_not_depend_on_padding(setup):
    config, processor, samples = setup
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    prompts = [split_prompt(s["messages"])[0] for s in samples[:4]]
    images = [[s["image"]] for s in samples[:4]]
    batched = greedy_answers(model, processor, prompts, images, max_new_tokens=4)
    alone = [greedy_answers(model, processor, [p], [i], max_new_tokens=4)[0]
             for p, i in zip(prompts, images)]
    assert batched == alone
    # The KV-cached answers equal the full-forward reference.
    assert batched == full_forward_answers(model, processor, prompts, images, max_new_tokens=4)


def test_normalize_answer():
    assert normalize_answer("  Row 2,  column 3. ") == "row 2, column 3"
    assert normalize_answer("Red") == normalize_answer("red.")
    assert normalize_answer("red") != normalize_answer("green")


def test_train_and_eval_commands(tmp_path):
    config_file = tmp_path / "small.json"
    config_file.write_text(json.dumps({**preset("tiny").to_dict(), **SMALL, "grid_side": None,
                                       "lm_vocab_size": None}))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--data", "synthetic", "--out",
                 str(run_dir), "--steps", "2", "--warmup-steps", "1", "--batch-size", "2",
                 "--eval-every", "0", "--eval-batches", "1", "--no-progress"]) == 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    assert main(["train", "--resume", str(run_dir), "--data", "synthetic", "--out", str(run_dir),
                 "--steps", "3", "--warmup-steps", "1", "--batch-size", "2", "--eval-every", "0",
                 "--eval-batches", "1", "--no-progress"]) == 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-3"
    report_path = tmp_path / "report.json"
    assert main(["eval", "--model", str(run_dir), "--data", "synthetic", "--n", "3",
                 "--max-new-tokens", "4", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 3 and 0.0 <= report["score"] <= 1.0 and report["loss"] > 0
    assert set(report["per_category"]) <= {"colour", "shape", "rows", "columns", "where"}
    int8_path = tmp_path / "report-int8.json"  # the same checkpoint with int8 decoder weights
    assert main(["eval", "--model", str(run_dir), "--data", "synthetic", "--n", "3",
                 "--max-new-tokens", "4", "--out", str(int8_path), "--weights", "int8"]) == 0
    int8 = json.loads(int8_path.read_text())
    assert int8["n"] == 3 and int8["loss"] == pytest.approx(report["loss"], rel=0.05)
