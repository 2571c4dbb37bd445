"""lmms-eval model adapter: `python -m lmms_eval --model tilevlm --model_args pretrained=DIR`.

Registered through the `lmms_eval.models` entry point (pyproject.toml), so lmms-eval finds it
once tilevlm is installed. Requests are answered with tilevlm's own loading, processor and
KV-cached generation:

- `generate_until`: the task's prompt as one user message (its images first), greedy unless the
  task asks for sampling, stopped at the task's `until` strings, in batches of `batch_size`.
- `loglikelihood`: the summed log-probability of the continuation after the prompt, and
  whether greedy decoding would have produced exactly it.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from tilevlm.config import IGNORE_INDEX
from tilevlm.inference.generation import generate
from tilevlm.weights.loading import load_for_inference
from tilevlm.inference.sampling import SamplingParams
from tilevlm.preprocessing.chat_template import IMAGE_PLACEHOLDER


def manifest() -> Any:
    """The entry point's payload: the model id and the class lmms-eval instantiates."""
    # Imported here: lmms_eval.models loads the entry points, this module among them.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tilevlm",
                         simple_class_path="tilevlm.integrations.lmms_eval.TilevlmLMM")


class TilevlmLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1,
                 tokenizer: str | None = None, max_new_tokens: int | str = 128,
                 **kwargs: Any) -> None:
        super().__init__()
        self.model, self.processor = load_for_inference(pretrained, device, tokenizer)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    # ------------------------------------------------------------------------ generation

    def generate_until(self, requests: list) -> list[str]:
        answers: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="tilevlm answering",
                          disable=len(requests) <= self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            answers += self._generate_chunk(chunk)
        return answers

    def _generate_chunk(self, chunk: list[tuple]) -> list[str]:
        conversations, images = zip(*(self._prompt(*args[:1], *args[2:]) for args in chunk))
        kwargs = dict(chunk[0][1])  # lmms-eval groups requests with the same generation kwargs
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0)
        sampling = SamplingParams(temperature=temperature,
                                  top_p=float(kwargs.get("top_p") or 1.0)) if temperature \
            else SamplingParams()
        batch = self.processor(list(conversations), list(images), padding_side="left",
                               add_generation_prompt=True)
        out = generate(self.model, batch, int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                       sampling=sampling, tokenizer=self.processor.tokenizer,
                       stop_strings=until or None)
        return out.texts

    def _prompt(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str
                ) -> tuple[list[dict[str, str]], list[Any]]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        text = context if IMAGE_PLACEHOLDER in context else IMAGE_PLACEHOLDER * len(visuals) + context
        return [{"role": "user", "content": text}], visuals

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("tilevlm's lmms-eval adapter answers single-round tasks")

    # ------------------------------------------------------------------------ likelihood

    @torch.no_grad()
    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        return [self._loglikelihood(*r.args) for r in requests]

    def _loglikelihood(self, context: str, doc_to_target: Any, doc_to_visual: Any, doc_id: int,
                       task: str, split: str) -> tuple[float, bool]:
        doc = self.task_dict[task][split][doc_id]
        continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
        messages, images = self._prompt(context, doc_to_visual, doc_id, task, split)
        messages = [*messages, {"role": "assistant", "content": continuation}]
        batch = self.processor([messages], [images])
        labels = batch["labels"][0]  # the continuation's tokens (and the closing <|im_end|>)
        keep = (labels != IGNORE_INDEX).nonzero().flatten()[:-1]  # without <|im_end|>
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "pixel_values") and v is not None}
        logits = self.model(**inputs).logits[0].float()  # (T, V)
        log_probs = torch.log_softmax(logits[keep - 1], dim=-1)  # positions predicting them
        targets = batch["input_ids"][0, keep].to(device)
        total = float(log_probs.gather(1, targets[:, None]).sum())
        greedy = bool((log_probs.argmax(-1) == targets).all())
        return total, greedy
