"""`tilevlm export --format idefics3`: a directory transformers and llama.cpp's converter take as
it is.

- transformers: `AutoProcessor.from_pretrained(export).apply_chat_template(...)` (the model's own
  template, as transformers 5's processors find it) gives the prompt ids tilevlm's processor
  gives for the same conversation, and `Idefics3ForConditionalGeneration` answers them with the
  greedy tokens tilevlm's `generate` gives, for a model without a template (ChatML) and one with
  SmolVLM's (transformers' own SmolVLM default).
- llama.cpp: config.json and preprocessor_config.json hold every field `convert_hf_to_gguf.py`
  reads for the text model and for `--mmproj`, with the model's values (the converter falls back
  to defaults silently: a missing `scale_factor` is 2, a missing `layer_norm_eps` 1e-5, a missing
  rope theta 10000). The rules are the converter's (llama.cpp vendored in llama-cpp-python
  0.3.36: conversion/base.py get_model_architecture, TextModel and MmprojModel, llama.py,
  smolvlm.py); llama.cpp itself is not needed here. README has the conversion run by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (as_tilevlm_chat, make_idefics3, make_photo, run_tilevlm, text_part,
                     write_idefics3_tokenizer)
from tilevlm.inference.generation import generate
from tilevlm.weights.loading import load_for_inference

transformers = pytest.importorskip("transformers")


def _image(seed: int) -> dict:
    return {"type": "image", "image": make_photo(150 + 40 * seed, 100 + 30 * seed, 30 + seed)}


# Conversations as transformers' processors take them (parts); tilevlm gets the same text with
# "<image>" where each image part stands, and the images in order.
CONVERSATIONS = {
    "image_then_text": [{"role": "user", "content": [_image(0), text_part("What is in it?")]}],
    "text_then_image": [{"role": "user", "content": [text_part("Look: "), _image(1)]}],
    "two_images": [{"role": "user", "content": [_image(2), text_part(" or "), _image(3),
                                                text_part(" - which?")]}],
    "multi_turn": [{"role": "user", "content": [_image(1), text_part("What is it?")]},
                   {"role": "assistant", "content": [text_part("Blobs.")]},
                   {"role": "user", "content": [text_part("Colours?")]}],
    "system": [{"role": "system", "content": [text_part("Be brief.")]},
               {"role": "user", "content": [_image(4), text_part("Colour?")]}],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Factory: exported(template) -> (the source SmolVLM directory, its export through the
    real CLI); template "chatml" (the model has none) or "smolvlm" (transformers' default)."""
    made: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("export")
    tok = write_idefics3_tokenizer(root / "tok")
    make_idefics3(root / "smol", tok, patch=16, tile=64, scale=2, model_type="smolvlm")

    def get(template: str) -> tuple[Path, Path]:
        if template not in made:
            source = root / f"source_{template}"
            shutil.copytree(root / "smol", source)
            if template == "smolvlm":
                from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

                (source / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
            out = root / f"hf_{template}"
            done = run_tilevlm("export", "--format", "idefics3", source, out)
            assert done.returncode == 0, done.stderr
            made[template] = source, out
        return made[template]

    return get


@pytest.mark.parametrize("template", ["chatml", "smolvlm"])
def test_auto_processor_apply_chat_template_gives_our_prompt_and_answers(exported, template):
    source, out = exported(template)
    hf_processor = transformers.AutoProcessor.from_pretrained(out)
    hf_model = transformers.Idefics3ForConditionalGeneration.from_pretrained(out).eval()
    hf_model.generation_config.eos_token_id = None  # 12 tokens each, as ours
    model, processor = load_for_inference(source, device="cpu")
    for name, conversation in CONVERSATIONS.items():
        theirs = hf_processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True,
                                                  return_tensors="pt")
        messages, images = as_tilevlm_chat(conversation)
        ours = processor([messages], [images], add_generation_prompt=True)
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist(), name
        with torch.no_grad():
            tokens = hf_model.generate(**theirs, max_new_tokens=12, do_sample=False)
        again = generate(model, ours, max_new_tokens=12, eos_token_ids=[])
        assert again.tokens[0] == tokens[0, theirs["input_ids"].shape[1]:].tolist(), name


def test_the_export_carries_the_chat_template_where_transformers_reads_it(exported):
    _, out = exported("smolvlm")
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    assert (out / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE  # used as it is
    legacy = json.loads((out / "chat_template.json").read_text())
    assert legacy == {"chat_template": DEFAULT_CHAT_TEMPLATE}
    assert "chat_template" not in json.loads((out / "processor_config.json").read_text())
    assert transformers.AutoProcessor.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE


# A template that reads only a list's text parts (the third form tilevlm's processor serves)
TEXT_PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}"
                       "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}\n"
                       "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.mark.parametrize("template", [None, TEXT_PARTS_TEMPLATE])
def test_the_written_template_renders_in_transformers_what_ours_renders(template):
    """For templates that do not read image parts themselves (ChatML: a string; the one above:
    text parts only), transformers renders the written template over its parts as tilevlm's
    processor renders the original over the text with `<image>` placeholders."""
    from types import SimpleNamespace

    from transformers.utils.chat_template_utils import render_jinja_template

    from tilevlm.preprocessing.tokenizer import VLMTokenizer
    from tilevlm.weights.export_idefics3 import processor_chat_template

    holder = SimpleNamespace(chat_template=template, bos_token=None, eos_token="<|im_end|>")
    written = processor_chat_template(holder)
    for conversation in CONVERSATIONS.values():
        parts = [{"role": m["role"], "content": [{k: v for k, v in c.items() if k != "image"}
                                                 for c in m["content"]]} for m in conversation]
        (theirs,), _ = render_jinja_template(conversations=[parts], chat_template=written,
                                             add_generation_prompt=True)
        messages, _ = as_tilevlm_chat(conversation)
        ours = "".join(text for text, _ in VLMTokenizer.chat_segments(
            SimpleNamespace(chat_template=template, bos_token=None, eos_token="<|im_end|>"),
            messages, True))
        assert theirs == ours


# ----------------------------------------------------------------------------- llama.cpp

# The architectures convert_hf_to_gguf.py registers for the two halves (llama.py's LlamaModel,
# smolvlm.py's SmolVLMModel)
LLAMA_TEXT_ARCHITECTURES = {"LlamaForCausalLM", "VLlama3ForCausalLM", "LLaMAForCausalLM",
                            "MistralForCausalLM", "LlamaModel"}
MMPROJ_ARCHITECTURES = {"Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"}


def _text_hparams(config: dict) -> dict:
    """TextModel: text_config merged over the top level (its keys win)."""
    return {**config, **config["text_config"]}


def _rope_theta(hparams: dict) -> float | None:
    """TextModel: rope_parameters (or rope_scaling), else the rope_theta field mirrored in."""
    rope = hparams.get("rope_parameters", hparams.get("rope_scaling")) or {}
    return rope.get("rope_theta", hparams.get("rope_theta"))


def test_config_holds_every_field_llama_cpp_s_converter_reads(exported):
    source, out = exported("chatml")
    config = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    cfg = load_for_inference(source, device="cpu")[1].config
    # get_model_architecture: the text model by text_config.architectures, the projector by the
    # top-level one (the issue: without the former the text model was "not supported")
    assert config["text_config"]["architectures"][0] in LLAMA_TEXT_ARCHITECTURES
    assert config["architectures"][0] in MMPROJ_ARCHITECTURES
    text = _text_hparams(config)
    expected_text = {"num_hidden_layers": cfg.lm_n_blocks, "hidden_size": cfg.lm_hidden_dim,
                     "intermediate_size": cfg.lm_inter_dim, "num_attention_heads": cfg.lm_n_heads,
                     "num_key_value_heads": cfg.lm_n_kv_heads, "rms_norm_eps": cfg.lm_rms_eps,
                     "max_position_embeddings": cfg.lm_max_position_embeddings,
                     "vocab_size": cfg.lm_vocab_size, "head_dim": cfg.lm_head_dim,
                     "tie_word_embeddings": cfg.lm_tie_weights}
    assert {k: text.get(k) for k in expected_text} == expected_text
    assert _rope_theta(text) == cfg.lm_re_base == config["text_config"]["rope_theta"]
    assert config["vocab_size"] == cfg.lm_vocab_size  # the top level agrees with the text model
    # MmprojModel + SmolVLMModel: the vision tower, the projector, the image processor
    vision = config["vision_config"]
    expected_vision = {"image_size": cfg.vit_img_size, "patch_size": cfg.vit_patch_size,
                       "hidden_size": cfg.vit_hidden_dim, "intermediate_size": cfg.vit_inter_dim,
                       "num_hidden_layers": cfg.vit_n_blocks,
                       "num_attention_heads": cfg.vit_n_heads, "layer_norm_eps": cfg.vit_ln_eps}
    assert {k: vision.get(k) for k in expected_vision} == expected_vision
    assert config["scale_factor"] == cfg.mp_pixel_shuffle_factor
    assert config["text_config"]["hidden_size"] == cfg.lm_hidden_dim  # the projection's width
    assert pre["image_mean"] == list(cfg.image_mean) and pre["image_std"] == list(cfg.image_std)
    assert pre["size"]["longest_edge"] == cfg.max_img_size
    # the tensors' names: text under model.text_model. (the converter strips "text_model."),
    # the projector's under model.vision_model. and model.connector.
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    text_names = {n for n in names if n.startswith("model.text_model.") or n == "lm_head.weight"}
    vision_names = {n for n in names if n.startswith(("model.vision_model.", "model.connector."))}
    assert text_names | vision_names == names and text_names and vision_names
    assert ("lm_head.weight" in names) == (not cfg.lm_tie_weights)


def test_real_smolvlm_field_names_and_values(exported):
    """The fields real SmolVLM directories carry beside transformers' own (their config.json:
    text_config.architectures ["VLlama3ForCausalLM"], rope_theta, a top-level vocab_size, the
    vision tower's max_image_size and size), and transformers reads the export's config back."""
    _, out = exported("chatml")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
    assert config["model_type"] == "idefics3" and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "idefics3_vision"
    assert config["vision_config"]["max_image_size"] == {"longest_edge": 64}
    assert config["vision_config"]["size"] == {"longest_edge": 192}
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.text_config.architectures == ["VLlama3ForCausalLM"]
    assert loaded.image_token_id == config["image_token_id"] and loaded.scale_factor == 2
