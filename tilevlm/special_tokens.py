"""Special tokens and the token layout of one image: the one home of both facts.

tilevlm's own tokens are nanoVLM's, so its checkpoints keep their token ids. They follow the
base vocabulary in this order: IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, then grid_token(r, c) for r, c in
1..grid_side row-major (`r1c1 ... r1cG, r2c1 ... rGcG`).

How one image with an n_h x n_w tile grid is written is a named layout (`VLMConfig.
image_token_layout`), each defined here (`LAYOUTS`, `image_pieces`) and nowhere else:

- "tilevlm" (the seed's; the default): when the grid is larger than 1x1 and the global tile is
  used, GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN x L for the thumbnail, then per tile, row-major,
  grid_token(i, j) + IMAGE_TOKEN x L. A 1x1 grid is grid_token(1, 1) + IMAGE_TOKEN x L, so every
  tile is named by its cell.
- "nanovlm" (nanoVLM's `get_image_string`, for the models it trained): the global part always
  comes first, and a 1x1 grid is the global part alone; when a sample holds several images,
  each is preceded by the text label `<image: {index}>`.
- "idefics3" (transformers' Idefics3Processor, for Idefics3 / SmolVLM checkpoints): per tile,
  row-major, `<fake_token_around_image>` grid_token(i, j) + `<image>` x L, the text "\\n" after
  each grid row, then "\\n" `<fake_token_around_image><global-img>` + `<image>` x L +
  `<fake_token_around_image>`: the global tile last. A 1x1 grid (rows = cols = 0 in
  transformers) is the global form alone. Its tokens are the tokenizer's own (nothing appended).

A layout is written as pieces: special tokens (one id each) and text (tokenized like any text:
"\\n", nanoVLM's label). The tiles' pixels come in the order of their tokens: the global tile
first or last as the layout says (`TokenLayout.global_first`), the grid row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<|image|>"
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
IDEFICS3_IMAGE_TOKEN = "<image>"
IDEFICS3_GLOBAL_TOKEN = "<global-img>"
IDEFICS3_WRAPPER_TOKEN = "<fake_token_around_image>"

Piece = tuple[str, bool]  # (text, is_special): a special token, or text to tokenize

# SmolVLM's tokenizer (HuggingFaceTB/SmolVLM-256M-Instruct; SmolVLM2's is the same): after
# SmolLM2's 49,152 tokens come <global-img> (49152), <row_1_col_1> ... <row_6_col_6> row-major
# (49153-49188), <fake_token_around_image> (49189), <image> (49190, config.json's
# image_token_id), reserved tokens and <end_of_utterance> (49279, its EOS): 128 tokens in all;
# <|im_start|> is 1 (BOS) and <|im_end|> 2 (pad). Sources: the added_tokens.json ids quoted in
# public SmolVLM2 tokenizer fixtures and configs (tokenizer_config.json: bos <|im_start|>, eos
# <end_of_utterance>, pad <|im_end|>).
SMOLVLM_GRID_SIDE = 6
SMOLVLM_ADDED_TOKENS = 128
SMOLVLM_BOS_ID, SMOLVLM_PAD_ID = 1, 2
SMOLVLM_EOS_TOKEN = "<end_of_utterance>"


@dataclass(frozen=True)
class TokenLayout:
    """What a layout needs besides its writing rule (`image_pieces`)."""

    name: str
    image_token: str  # the placeholder each image feature replaces
    global_token: str  # marks the global (whole image) tile
    global_first: bool  # the global tile's pixels (and tokens) come before the grid's
    appended: bool  # True: our tokens follow the base vocabulary (`special_tokens`); False:
    # the tokenizer already holds them (`required_tokens`), at ids of its own
    wrapper_token: str | None = None  # Idefics3's <fake_token_around_image>
    needs_global: bool = False  # the layout always writes a global part


LAYOUTS = {
    "tilevlm": TokenLayout("tilevlm", IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, True, True),
    "nanovlm": TokenLayout("nanovlm", IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, True, True,
                           needs_global=True),
    "idefics3": TokenLayout("idefics3", IDEFICS3_IMAGE_TOKEN, IDEFICS3_GLOBAL_TOKEN, False, False,
                            IDEFICS3_WRAPPER_TOKEN, needs_global=True),
}
IMAGE_TOKEN_LAYOUTS = tuple(LAYOUTS)


def grid_token(row: int, col: int) -> str:
    """The token string for tile (row, col), both 1-based: `r{row}c{col}` in the seed's names."""
    return f"<row_{row}_col_{col}>"


def smolvlm_token_ids(base_vocab_size: int) -> dict[str, int]:
    """Ids of the idefics3 layout's tokens as SmolVLM's tokenizer places them after a base
    vocabulary of `base_vocab_size` tokens (49,152 in SmolVLM itself)."""
    wrapper = base_vocab_size + 1 + SMOLVLM_GRID_SIDE ** 2
    ids = {IDEFICS3_GLOBAL_TOKEN: base_vocab_size, IDEFICS3_WRAPPER_TOKEN: wrapper,
           IDEFICS3_IMAGE_TOKEN: wrapper + 1}
    for r in range(1, SMOLVLM_GRID_SIDE + 1):
        for c in range(1, SMOLVLM_GRID_SIDE + 1):
            ids[grid_token(r, c)] = base_vocab_size + 1 + (r - 1) * SMOLVLM_GRID_SIDE + c - 1
    return ids


def smolvlm_added_tokens(base_vocab_size: int, count: int = SMOLVLM_ADDED_TOKENS) -> list[str]:
    """The `count` tokens SmolVLM's tokenizer adds after the base vocabulary, in id order: the
    idefics3 layout's (`smolvlm_token_ids`), reserved fillers, and <end_of_utterance> (its EOS)
    last when there is room for it. For tokenizers made to SmolVLM's shape (benchmarks)."""
    layout = sorted(smolvlm_token_ids(base_vocab_size).items(), key=lambda kv: kv[1])
    tokens = [token for token, _ in layout]
    room = count - len(tokens)
    if room < 0:
        raise ValueError(f"lm_vocab_size {base_vocab_size + count} leaves no room for SmolVLM's "
                         f"{len(tokens)} image tokens after {base_vocab_size}")
    reserved = [f"<|reserved_special_token_{k}|>" for k in range(room - 1)]
    return tokens + reserved + ([SMOLVLM_EOS_TOKEN] if room else [])


def special_tokens(grid_side: int) -> list[str]:
    """Our appended special tokens in id order: image, global image, then the grid row-major."""
    grid = [grid_token(r, c) for r in range(1, grid_side + 1) for c in range(1, grid_side + 1)]
    return [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *grid]


def get_layout(name: str) -> TokenLayout:
    """The layout of this name; a ValueError naming the known ones otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"VLMConfig.image_token_layout must be one of "
                         f"{', '.join(IMAGE_TOKEN_LAYOUTS)}, got {name!r:.60}")
    return LAYOUTS[name]


def appended_tokens(layout: str, grid_side: int) -> list[str]:
    """The tokens a layout appends after the base vocabulary, in id order (none for idefics3)."""
    return special_tokens(grid_side) if get_layout(layout).appended else []


def required_tokens(layout: str, grid_side: int) -> list[str]:
    """Every special token the layout writes for grids up to grid_side x grid_side."""
    spec = get_layout(layout)
    grid = [grid_token(r, c) for r in range(1, grid_side + 1) for c in range(1, grid_side + 1)]
    wrapper = [spec.wrapper_token] if spec.wrapper_token else []
    return [spec.image_token, spec.global_token, *wrapper, *grid]


def check_layout(layout: str, use_global: bool) -> None:
    """A ValueError unless `layout` is a known layout that works with `use_global`."""
    if get_layout(layout).needs_global and not use_global:
        raise ValueError(f"VLMConfig.image_token_layout {layout!r} always writes the global "
                         "image token, so it needs use_global_tile = true")


def has_global_tile(grid: tuple[int, int], use_global: bool) -> bool:
    """A global tile joins the grid when asked for and the grid is larger than 1x1."""
    return use_global and grid[0] * grid[1] > 1


def image_pieces(grid: tuple[int, int], tokens_per_tile: int, use_global: bool,
                 layout: str = "tilevlm") -> list[Piece]:
    """The pieces standing for one image with this tile grid, in order."""
    spec = get_layout(layout)
    if spec.name == "idefics3":
        return _idefics3_pieces(grid, tokens_per_tile, spec)
    tile = [(spec.image_token, True)] * tokens_per_tile
    global_part = [(spec.global_token, True), *tile]
    if spec.name == "nanovlm" and tuple(grid) == (1, 1):
        return global_part  # the only tile is the whole image
    out = global_part if has_global_tile(grid, use_global) else []
    for i in range(1, grid[0] + 1):
        for j in range(1, grid[1] + 1):
            out += [(grid_token(i, j), True), *tile]
    return out


def _idefics3_pieces(grid: tuple[int, int], tokens_per_tile: int, spec: TokenLayout
                     ) -> list[Piece]:
    wrap, tile = (spec.wrapper_token, True), [(spec.image_token, True)] * tokens_per_tile
    global_part = [wrap, (spec.global_token, True), *tile, wrap]
    if tuple(grid) == (1, 1):
        return global_part
    out: list[Piece] = []
    for i in range(1, grid[0] + 1):
        for j in range(1, grid[1] + 1):
            out += [wrap, (grid_token(i, j), True), *tile]
        out.append(("\n", False))
    return out + [("\n", False), *global_part]


def image_tokens(grid: tuple[int, int], tokens_per_tile: int, use_global: bool,
                 layout: str = "tilevlm") -> list[str]:
    """`image_pieces` as strings (one string per special token or text piece)."""
    return [text for text, _ in image_pieces(grid, tokens_per_tile, use_global, layout)]


def text_runs(pieces: list[Piece]) -> tuple[int, list[str]]:
    """(number of special tokens, the text between them): consecutive text pieces are one run,
    tokenized as the text it is (special tokens split text, so each run stands alone)."""
    n_special, runs, current = 0, [], ""
    for text, special in pieces:
        if special:
            n_special += 1
            if current:
                runs.append(current)
            current = ""
        else:
            current += text
    return n_special, runs + ([current] if current else [])


def image_label(layout: str, index: int, n_images: int) -> str:
    """The text written before image `index` (0-based) of a sample with `n_images` images."""
    return f"<image: {index}>" if layout == "nanovlm" and n_images > 1 else ""
