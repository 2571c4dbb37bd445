"""Tokenizers for tilevlm: a Hugging Face tokenizer directory read offline, or a small byte-level
BPE trained here, plus our special tokens and the chat format: the tokenizer's own chat_template
when its tokenizer_config.json has one (`tilevlm.preprocessing.jinja_chat`), else ChatML.

For the tilevlm and nanovlm layouts our special tokens come right after the base vocabulary, in
the order `tilevlm.special_tokens` defines. A layout whose tokens are the tokenizer's own
(idefics3: SmolVLM's tokenizer holds `<image>`, `<global-img>`, ...) gets nothing appended: the
tokens must be there, at whatever ids the tokenizer gives them. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tilevlm.files import check_regular_file, parse_json, read_json_object, rust_io_errors
from tilevlm.preprocessing.chat_template import (CHATML_JINJA, IM_END, IM_START, chat_segments,
                                                 check_message)
from tilevlm.preprocessing.jinja_chat import content_form, renderer, template_segments
from tilevlm.preprocessing.user_text import Hidden, Spellings
from tilevlm.special_tokens import (GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, get_layout, grid_token,
                                    required_tokens, special_tokens)

logger = logging.getLogger(__name__)
TOKENIZER_CONFIG = "tokenizer_config.json"

ENDOFTEXT = "<|endoftext|>"


class VLMTokenizer:
    """A `tokenizers.Tokenizer` with tilevlm's special tokens, ids and chat template.

    Build one with `load_tokenizer` or `train_bpe_tokenizer`. `pad_token_id` is the base
    tokenizer's pad token, or its eos token when it has none (as nanoVLM does); padded positions are
    masked by the attention mask and the labels, so the choice never reaches the loss.
    """

    def __init__(self, tokenizer: Tokenizer, grid_side: int, base_vocab_size: int,
                 eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None,
                 layout: str = "tilevlm", source: str = "the tokenizer") -> None:
        self.tokenizer = tokenizer
        self.source = source  # where it was read from, for error messages
        # The model's own Jinja chat template; None (or ChatML itself): the built-in ChatML.
        self.chat_template = None if chat_template == CHATML_JINJA else chat_template
        self.grid_side = grid_side
        self.base_vocab_size = base_vocab_size
        self.layout = get_layout(layout)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.eos_token_id = self._require_id(self.eos_token, "eos")
        self.pad_token_id = self._require_id(self.pad_token, "pad")
        self.bos_token_id = self._require_id(bos_token, "bos") if bos_token is not None else None
        self.image_token_id = self._require_id(self.layout.image_token, "image")
        self.global_image_token_id = self._require_id(self.layout.global_token, "global image")
        # ChatML markers: always there with appended tokens (added when missing); a tokenizer
        # taken as it is may lack them (None), and then only `Processor.encode_texts` applies.
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        if self.layout.appended:
            self._require_id(IM_START, "chat start")
            self._require_id(IM_END, "chat end")
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        # What user text may not spell as tokens (`user_text`): every special added token, and
        # the layout's, the chat markers and eos/bos/pad whatever their flag.
        self.spellings = Spellings([
            *(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
            *required_tokens(layout, grid_side), IM_START, IM_END, self.eos_token,
            self.pad_token, *([bos_token] if bos_token else [])])
        self._control_ids = {tokenizer.token_to_id(t) for t in self.spellings.tokens} - {None}

    def _require_id(self, token: str, what: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the {what} token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more characters of
        text (byte-level entries even cover fewer), so a text of more than N times this many
        characters has more than N tokens, known before tokenizing it."""
        return max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=False))

    def grid_token_id(self, row: int, col: int) -> int:
        """The id of grid token (row, col), both 1-based."""
        if not (1 <= row <= self.grid_side and 1 <= col <= self.grid_side):
            raise ValueError(f"grid cell r{row}c{col} is outside the tokenizer's "
                             f"{self.grid_side}x{self.grid_side} grid tokens")
        return self._require_id(grid_token(row, col), "grid")

    def chat_segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
                      ) -> list[tuple[str, bool]]:
        """The conversation as text pieces in this tokenizer's chat format, each with whether
        it counts for the loss: its own `chat_template` when it has one, else ChatML."""
        if self.chat_template is None:
            return chat_segments(messages, add_generation_prompt)
        tokens = dict(bos_token=self.bos_token, eos_token=self.eos_token)
        render = renderer(self.chat_template, content_form(self.chat_template, **tokens), **tokens)
        return template_segments(render, messages, add_generation_prompt)

    def marked_segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
                        ) -> tuple[list[tuple[str, bool]], Hidden | None]:
        """`chat_segments` of the messages with every special-token spelling in their text
        replaced by a mark (`user_text`), and what the marks stand for; `encode_marked` encodes
        the segments (and anything put between them, such as the images' tokens)."""
        for i, m in enumerate(messages):
            check_message(m, i)
        hidden_messages, hidden = self.spellings.hide(messages, self.chat_template or "")
        return self.chat_segments(hidden_messages, add_generation_prompt), hidden

    def encode_marked(self, texts: list[str], hidden: Hidden | None) -> list[list[int]]:
        """Token ids of texts from `marked_segments`: special tokens parsed in the template's
        text and the images' tokens, the marked spellings encoded as plain text."""
        return Spellings.encode(texts, hidden, self.encode_batch, self._encode_plain)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens in it are kept whole; no BOS/EOS is added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text; `add_special_tokens`: what the tokenizer's own post-processor
        adds (a BOS, say), as a transformers tokenizer does by default. Special tokens spelled in
        the text are parsed: for text written by a chat template (user text goes through
        `marked_segments` and `encode_marked`)."""
        return self._encode(self.tokenizer, texts, add_special_tokens)

    def _encode(self, tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool = False
                ) -> list[list[int]]:
        try:
            encoded = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        except BaseException as e:  # noqa: BLE001 - a Rust panic (a regex that blows up) is a
            if isinstance(e, (KeyboardInterrupt, SystemExit)):  # BaseException
                raise
            raise ValueError(_encode_failure(self.source, texts, e)) from None
        return [e.ids for e in encoded]

    @functools.cached_property
    def _plain(self) -> Tokenizer:
        """The same tokenizer with special tokens not parsed: their spellings are text."""
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text with special tokens not parsed; a control token the tokenizer holds
        as a plain (not special) added token is cut after its first character."""
        out = self._encode(self._plain, texts)
        for k, (text, ids) in enumerate(zip(texts, out)):
            if self._control_ids.intersection(ids) and len(text) > 1:
                out[k] = [i for part in self._encode(self._plain, [text[:1], text[1:]])
                          for i in part]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (read back by `load_tokenizer`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with rust_io_errors(directory / "tokenizer.json"):  # a full disk: an OSError
            self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "bos_token": self.bos_token,
                  "chat_template": self.chat_template or CHATML_JINJA, "tilevlm_grid_side": self.grid_side,
                  "tilevlm_base_vocab_size": self.base_vocab_size}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- loading

def load_tokenizer(directory: str | Path, grid_side: int = 8,
                   layout: str = "tilevlm") -> VLMTokenizer:
    """Read a Hugging Face tokenizer directory and add tilevlm's special tokens (for a layout
    whose tokens are the tokenizer's own, check they are all there and add nothing).

    Needs `tokenizer.json`; eos/pad/bos token strings come from `tokenizer_config.json` or
    `special_tokens_map.json` when present. Without an eos token, `<|im_end|>` is used (it ends
    every assistant turn). Tokens a saved tilevlm tokenizer already has keep their ids (checked).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: tokenizer directory not found; give a directory with "
                         "tokenizer.json (and tokenizer_config.json) from a Hugging Face model")
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no tokenizer.json; a fast Hugging Face tokenizer "
                         "(tokenizer.json, plus tokenizer_config.json for eos/pad/bos) is needed")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not isinstance(parse_json(text, str(path)), dict):  # the checks every JSON file gets
        raise ValueError(f"{path}: expected a JSON object")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a plain Exception on malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    config = read_json_object(directory / TOKENIZER_CONFIG, missing_ok=True)
    names = _special_token_names(directory, config)
    if get_layout(layout).appended:
        _ensure_chat_markers(tok, str(directory))
        base = _add_vlm_tokens(tok, grid_side, str(directory))
    else:
        base = _check_own_tokens(tok, layout, grid_side, str(directory))
    eos = names.get("eos_token") or IM_END
    if "eos_token" not in names:
        logger.debug("%s: no eos token configured; using %s", directory, IM_END)
    template = _chat_template(directory, config)
    if template is not None:
        try:  # a template that writes no message text is refused here, not at every prompt
            content_form(template, bos_token=names.get("bos_token"), eos_token=eos)
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None
    _probe(tok, path)
    return VLMTokenizer(tok, grid_side, base, eos, names.get("pad_token"), names.get("bos_token"),
                        template, layout=layout, source=str(path))


def _encode_failure(source: str, texts: list[str], error: BaseException) -> str:
    """Why encoding failed: text that is not valid Unicode (a lone surrogate, as a command-line
    argument that is not UTF-8 gives), or the tokenizer itself."""
    for text in texts:
        if not isinstance(text, str):
            return f"text to tokenize must be a string, got a {type(text).__name__}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"the text is not valid UTF-8: it holds {e.object[e.start:e.end]!r} "
                    f"({e.reason}; bytes that are not UTF-8 read as such); give UTF-8 text")
    return f"{source}: the tokenizer failed on the text ({type(error).__name__}: {error})"


# Long runs of one kind of character that end in another: what makes a backtracking regex (a
# pre-tokenizer's or normalizer's `Split` / `Replace` pattern) blow up.
_PROBES = [c * 64 + end for c in ("a", "A", "0", " ", "\n", "é", "\u4e00", "!", "\t", "_")
           for end in ("!", "a", " ", "")] + ["word " * 40 + "!", "a1" * 64 + "!"]


def _probe(tok: Tokenizer, path: Path) -> None:
    """Encode ordinary text once when the tokenizer is read: one whose regex blows up (an
    Oniguruma retry-limit panic) is refused here in one line, not at a prompt; its panic
    message, which Rust prints itself, is kept off stderr."""
    try:
        with _stderr_muted():
            tok.encode_batch(_PROBES, add_special_tokens=False)
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"{path}: the tokenizer fails on ordinary text "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); its "
                         "pre-tokenizer or normalizer is broken") from None


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (what Rust code prints goes there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _check_own_tokens(tok: Tokenizer, layout: str, grid_side: int, source: str) -> int:
    """Every token of `layout` (grids up to grid_side) must be in the tokenizer; return its size."""
    missing = [t for t in required_tokens(layout, grid_side) if tok.token_to_id(t) is None]
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more)" if len(missing) > 6
                                          else "")
        raise ValueError(f"{source}: the tokenizer lacks the {layout} layout's tokens {shown} "
                         "(they are not added: the model's ids are the tokenizer's own; give the "
                         "tokenizer the checkpoint came with)")
    return _vocab_size(tok)


def _special_token_names(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    """eos/pad/bos strings; tokenizer_config.json (`config`) wins over special_tokens_map.json."""
    names: dict[str, str] = {}
    sources = ((directory / "special_tokens_map.json",
                read_json_object(directory / "special_tokens_map.json", missing_ok=True)),
               (directory / TOKENIZER_CONFIG, config))
    for path, data in sources:
        for key in ("eos_token", "pad_token", "bos_token"):
            value = data.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if value is not None and not isinstance(value, str):  # a file we did not write
                raise ValueError(f"{path}: {key} must be a token string (or an object with its "
                                 f"'content'), got {data.get(key)!r:.60}")
            if value:
                names[key] = value
    return names


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The directory's chat template, where transformers looks for one, in its order:
    chat_template.jinja, chat_template.json (SmolVLM / Idefics3 directories keep theirs there),
    then tokenizer_config.json's (`config`) `chat_template` (the default one of a named list);
    or None."""
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        check_regular_file(jinja)
        try:
            return _usable(jinja.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja}: not UTF-8 text ({e.reason})") from None
    for path in (directory / "chat_template.json", directory / TOKENIZER_CONFIG):
        data = config if path.name == TOKENIZER_CONFIG else read_json_object(path, missing_ok=True)
        template = data.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path}: chat_template must be a string (or a list of named "
                             f"templates with a 'default'), got {template!r:.60}")
        if _usable(template):
            return template
    return None


def _usable(template: object) -> str | None:
    return template if isinstance(template, str) and template.strip() else None


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _ensure_chat_markers(tok: Tokenizer, source: str) -> None:
    missing = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([_special(t) for t in missing])
        logger.debug("%s: added ChatML markers %s as special tokens", source, ", ".join(missing))


def _vocab_size(tok: Tokenizer) -> int:
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _add_vlm_tokens(tok: Tokenizer, grid_side: int, source: str) -> int:
    """Add image/global/grid tokens after the base vocabulary; return the base vocabulary size.

    Tokens already present (a tokenizer we saved) must sit exactly where they would be added.
    """
    existing = tok.token_to_id(IMAGE_TOKEN)
    base = existing if existing is not None else _vocab_size(tok)
    before = _vocab_size(tok)
    for index, content in enumerate(special_tokens(grid_side)):
        if tok.token_to_id(content) is None:
            tok.add_special_tokens([_special(content)])
        token_id = tok.token_to_id(content)
        if token_id != base + index:
            raise ValueError(
                f"{source}: special token {content} has id {token_id}, expected {base + index}: "
                f"{IMAGE_TOKEN}, {GLOBAL_IMAGE_TOKEN} and the grid tokens must follow the base "
                f"vocabulary ({base} tokens) in that order")
    logger.debug("%s: base vocabulary %d tokens, %d with image/grid tokens (%d new)",
                source, base, _vocab_size(tok), _vocab_size(tok) - before)
    return base


# ----------------------------------------------------------------------------- training

def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, grid_side: int = 8) -> VLMTokenizer:
    """A byte-level BPE trained on `texts`, with exactly `vocab_size` base tokens.

    Its first ids are <|endoftext|> (pad), <|im_start|> and <|im_end|> (eos, so generation stops at
    the end of an assistant turn). A small corpus that yields fewer merges is padded with unused
    `<|unused_{i}|>` tokens, so the base size always equals the config's `lm_base_vocab_size`.
    """
    first = [ENDOFTEXT, IM_START, IM_END]
    minimum = len(first) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (3 special tokens + 256 bytes), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    filler = vocab_size - _vocab_size(tok)
    if filler < 0:
        raise ValueError(f"BPE training produced {_vocab_size(tok)} tokens, more than {vocab_size}")
    tok.add_special_tokens([_special(f"<|unused_{i}|>") for i in range(filler)])
    base = _add_vlm_tokens(tok, grid_side, "trained BPE")
    if base != vocab_size:
        raise ValueError(f"trained BPE has {base} base tokens, expected {vocab_size}")
    return VLMTokenizer(tok, grid_side, base, eos_token=IM_END, pad_token=ENDOFTEXT)
