"""A tilevlm model written as a transformers Idefics3 directory (`tilevlm export --format
idefics3`): `config.json` (Idefics3Config), `model.safetensors` under transformers' keys (the key
maps of weights/huggingface.py and weights/idefics3.py run backwards: fused q/k/v and gate/up
rows split again), `preprocessor_config.json` + `processor_config.json` (Idefics3Processor),
the chat template where transformers 5's processors read it (`chat_template.jinja`; also
`chat_template.json`, the file older processors and SmolVLM directories use) and the tokenizer's
files, so `Idefics3ForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
(its `apply_chat_template` included) load it offline, and llama.cpp's `convert_hf_to_gguf.py`
converts it (text model and `--mmproj`).

config.json carries the fields real SmolVLM directories carry (HuggingFaceTB/SmolVLM*-Instruct):
`text_config.architectures` ["VLlama3ForCausalLM"], which llama.cpp's converter picks the text
model by, `text_config.rope_theta` beside transformers 5's `rope_parameters` (transformers 4
reads only the former), the top-level `vocab_size`, and the vision tower's `max_image_size` /
`size` (tests/test_export_idefics3.py checks every field the converter reads).

Only a model that already speaks Idefics3 can be written this way: the idefics3 token layout and
image rule, and a tokenizer holding the layout's tokens. Any other (a nanoVLM- or tilevlm-layout
model) is refused: transformers would load it and answer wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tilevlm.config import VLMConfig
from tilevlm.files import atomic_write
from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.preprocessing.chat_template import CHATML_JINJA, IMAGE_PLACEHOLDER
from tilevlm.preprocessing.jinja_chat import content_form
from tilevlm.weights.convert import KeyMap, expand
from tilevlm.weights.huggingface import (LLAMA_BLOCK_KEYS, LLAMA_CONFIG, LLAMA_HEAD_KEYS,
                                         LLAMA_KEYS, SIGLIP_BLOCK_KEYS, SIGLIP_CONFIG, SIGLIP_KEYS)
from tilevlm.weights.idefics3 import (LANCZOS, PREPROCESSOR_FILE, PROCESSOR_FILE, PROJECTOR_KEYS,
                                      TEXT_PREFIX, VISION_PREFIX, check_position_ids)
from tilevlm.weights.safetensors_files import CONFIG_FILE, WEIGHTS_FILE

TEXT_ARCHITECTURE = "VLlama3ForCausalLM"  # SmolVLM's text_config names its decoder so
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 / 5: processors and tokenizers
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"  # older processors; SmolVLM directories


def check_exportable(cfg: VLMConfig) -> None:
    """A ValueError (one line: why, and what to do) unless Idefics3 can express this model."""
    if (cfg.image_token_layout, cfg.image_rule) != ("idefics3", "idefics3"):
        raise ValueError(
            f"cannot export as idefics3: this model writes images in the "
            f"{cfg.image_token_layout!r} token layout with the {cfg.image_rule!r} image rule, "
            "which Idefics3 cannot express (its processor would feed the model tokens and tiles "
            "it never saw); export an Idefics3 / SmolVLM-born model (or one fine-tuned from it)")
    check_position_ids(cfg.patches_per_side, Path("the model"))


def _key_map(cfg: VLMConfig) -> KeyMap:
    """Our full key <- their full key(s), for every tensor of the model."""
    vision = expand(SIGLIP_KEYS, SIGLIP_BLOCK_KEYS, cfg.vit_n_blocks, "blocks.", "encoder.layers.")
    flat = LLAMA_KEYS if cfg.lm_tie_weights else {**LLAMA_KEYS, **LLAMA_HEAD_KEYS}
    text = expand(flat, LLAMA_BLOCK_KEYS, cfg.lm_n_blocks, "blocks.", "model.layers.")
    text_prefix = lambda k: k if k == "lm_head.weight" else TEXT_PREFIX + k[len("model."):]  # noqa: E731
    return {**{f"vision_encoder.{k}": tuple(VISION_PREFIX + s for s in v) for k, v in vision.items()},
            **{k: (v,) for k, v in PROJECTOR_KEYS.items()},
            **{f"decoder.{k}": tuple(text_prefix(s) for s in v) for k, v in text.items()}}


def _split_rows(cfg: VLMConfig, ours: str, n_parts: int) -> list[int] | int:
    """Row sizes of a fused tensor's parts: q/k/v (decoder: GQA sizes) or gate/up."""
    if ours.startswith("decoder.") and n_parts == 3:
        kv = cfg.lm_n_kv_heads * cfg.lm_head_dim
        return [cfg.lm_n_heads * cfg.lm_head_dim, kv, kv]
    return n_parts  # equal parts


def idefics3_tensors(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' Idefics3 keys."""
    cfg, state = model.cfg, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _key_map(cfg).items():
        tensor = state[ours].detach().cpu()
        sizes = _split_rows(cfg, ours, len(theirs))
        parts = (torch.chunk(tensor, sizes) if isinstance(sizes, int)
                 else torch.split(tensor, sizes)) if len(theirs) > 1 else (tensor,)
        out.update({key: part.contiguous() for key, part in zip(theirs, parts)})
    return out


def idefics3_config_json(cfg: VLMConfig, tokenizer: Any) -> dict[str, Any]:
    """config.json of Idefics3ForConditionalGeneration (names from the import tables), with the
    fields real SmolVLM directories carry (module docstring)."""
    vision = {theirs: getattr(cfg, ours) for ours, (theirs, _) in SIGLIP_CONFIG.items()}
    text = {theirs: getattr(cfg, ours) for ours, (theirs, _) in LLAMA_CONFIG.items()}
    text.update(architectures=[TEXT_ARCHITECTURE], model_type="llama",
                vocab_size=cfg.lm_vocab_size, head_dim=cfg.lm_head_dim,
                rope_theta=cfg.lm_re_base,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.lm_re_base},
                hidden_act="silu", attention_bias=False, mlp_bias=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id)
    return {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
            "image_token_id": cfg.image_token_id, "scale_factor": cfg.mp_pixel_shuffle_factor,
            "vocab_size": cfg.lm_vocab_size, "tie_word_embeddings": cfg.lm_tie_weights,
            "pad_token_id": tokenizer.pad_token_id,
            "vision_config": {**vision, "model_type": "idefics3_vision", "num_channels": 3,
                              "hidden_act": "gelu_pytorch_tanh",
                              "max_image_size": {"longest_edge": cfg.vit_img_size},
                              "size": {"longest_edge": cfg.max_img_size}},
            "text_config": text}


def image_settings_json(cfg: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json of Idefics3's image processor (what image_fields reads)."""
    return {"image_processor_type": "Idefics3ImageProcessor",
            "processor_class": "Idefics3Processor", "do_convert_rgb": True,
            "do_resize": True, "size": {"longest_edge": cfg.max_img_size},
            "max_image_size": {"longest_edge": cfg.vit_img_size},
            "do_image_splitting": cfg.image_splitting, "resample": LANCZOS, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std), "do_pad": True}


# Prepended to a template that reads a message's content as a string (or as one text part):
# transformers' processors hand it lists of parts, so the list becomes what our processor gives
# the template, the text with `<image>` where each image part stands.
_PARTS_TO_TEXT = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set joined = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set joined.text = joined.text + 'IMAGE' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set joined.text = joined.text + part['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = joined.text -%}{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': CONTENT}] -%}"
    "{%- endfor -%}{%- set messages = ns.messages -%}"
).replace("IMAGE", IMAGE_PLACEHOLDER)
_CONTENT = {"string": "text", "text": "[{'type': 'text', 'text': text}]"}


def processor_chat_template(tokenizer: Any) -> str:
    """The model's chat template (ChatML when it has none) as transformers' processors apply
    it: as it is when it reads image and text parts itself (SmolVLM's), else behind a prelude
    that turns the parts into the text our processor gives it, so both write the same prompt."""
    template = tokenizer.chat_template or CHATML_JINJA
    form = content_form(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    if form == "parts":
        return template
    return _PARTS_TO_TEXT.replace("CONTENT", _CONTENT[form]) + template


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def export_idefics3(model: VisionLanguageModel, tokenizer: Any, directory: str | Path) -> Path:
    """Write `model` and `tokenizer` as a transformers Idefics3 directory (config.json last).
    Every file of the export is written here, into `directory` as it is given."""
    cfg = model.cfg
    check_exportable(cfg)
    template = processor_chat_template(tokenizer)  # a template that cannot be used fails first
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = idefics3_tensors(model)
    atomic_write(directory / WEIGHTS_FILE,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(directory)
    _write_text(directory / CHAT_TEMPLATE_FILE, template)
    _write_json(directory / LEGACY_CHAT_TEMPLATE_FILE, {"chat_template": template})
    _write_json(directory / PREPROCESSOR_FILE, image_settings_json(cfg))
    _write_json(directory / PROCESSOR_FILE, {"processor_class": "Idefics3Processor",
                                             "image_seq_len": cfg.mp_image_token_length})
    _write_json(directory / CONFIG_FILE, idefics3_config_json(cfg, tokenizer))
    return directory
