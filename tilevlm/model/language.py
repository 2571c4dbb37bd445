"""Llama / SmolLM2 decoder over input embeddings, with a static, preallocated KV cache.

Computes what Hugging Face's `LlamaForCausalLM` computes (RMSNorm, RoPE in the "rotate_half"
convention so HF q/k weights load unpermuted, grouped-query attention, SwiGLU MLP), with fused
weights: `attn.qkv` holds the q, k, v rows in that order and `mlp.gate_up` the gate, up rows.

Without a cache:
    hidden = decoder(inputs_embeds, attention_mask=None | [B, T])        # [B, T, D]
    No mask (or an all-ones mask, outside torch.compile) uses SDPA's `is_causal=True`.
    A boolean [B, 1, T, T] mask (True = may attend; e.g. packing's document mask, several samples
    in one row) is used as is.

With the cache (generation; gpt-fast style, shapes never change so the decode step compiles):
    decoder.setup_cache(batch_size, max_len)  # once; K, V buffers [B, n_kv, max_len, hd]
    hidden = decoder(embeds, attention_mask=mask, cache_position=torch.arange(0, T))    # prefill
    hidden = decoder(next_embeds, attention_mask=mask, cache_position=torch.tensor([T]))  # decode
    decoder.clear_cache()                                              # frees the buffers
  `cache_position` [T] holds the cache slots the new tokens are written to; queries attend to
  every slot <= their own. `attention_mask` [B, S] (1 = real token, 0 = pad) covers the cached
  length S <= max_len (it is padded with ones up to max_len); pass it as [B, max_len] to keep
  the decode step's shapes static under torch.compile.

Rows with their own positions (continuous batching, `tilevlm.inference.rows`): `cache_position`
may also be [B, T], one row of slots per batch row, so rows of different lengths decode together
(each writes at its own length and sees its own slots <= that; slots past it hold stale values
and are masked). `KVCache.window(first_row, rows, slots)` is a cache over part of another
cache's buffers (a view, no copy): a row's prefill writes straight into its rows of the shared
cache, and a decode step attends over only the slots in use. These two are the only additions
to the attention code for serving; the [T] path is unchanged.

Positions: when `position_ids` is not given they come from the mask, `cumsum(mask) - 1` clamped at
0, so LEFT padding gives every sequence positions 0, 1, 2, ... from its first real token. Pad
queries attend to themselves only (never an empty row, so no NaN); their outputs are meaningless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilevlm.config import VLMConfig

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32, as Llama does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] positions -> cos, sin [B, T, head_dim] (frequencies repeated for the two halves)."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))  # (hd/2,)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, nh, T, hd] queries or keys; cos/sin [B, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, nh, T, hd)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 mask -> [B, L] positions counted over real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(key_valid: torch.Tensor | None, query_pos: torch.Tensor,
                      key_len: int) -> torch.Tensor:
    """Boolean SDPA mask [B or 1, 1, T, L]: causal over slots, pads hidden, a query sees itself.
    `query_pos` is [T] (every row's queries at the same slots) or [B, T] (per row)."""
    key_idx = torch.arange(key_len, device=query_pos.device)  # (L,)
    allowed = key_idx <= query_pos.unsqueeze(-1)  # (T, L) or (B, T, L)
    if key_valid is None:
        return allowed.unsqueeze(-3) if query_pos.dim() == 2 else allowed[None, None]
    own = key_idx == query_pos.unsqueeze(-1)  # (T, L) or (B, T, L)
    return (allowed & (key_valid.unsqueeze(1) | own)).unsqueeze(1)  # (B, 1, T, L)


class KVCache(nn.Module):
    """Preallocated keys and values [B, n_kv, max_len, hd], written in place at cache positions."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache whose buffers are the given tensors (views of another cache's, say)."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache.register_buffer("k", k, persistent=False)
        cache.register_buffer("v", v, persistent=False)
        return cache

    def window(self, first_row: int, rows: int, slots: int) -> KVCache:
        """Rows [first_row, first_row + rows) and slots [0, slots) of this cache, sharing its
        memory: what is written through the window is written here."""
        part = (slice(first_row, first_row + rows), slice(None), slice(0, slots))
        return KVCache.over(self.k[part], self.v[part])

    def update(self, cache_position: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was set up for batch size {self.k.shape[0]}, "
                             f"got a batch of {k.shape[0]}")
        if cache_position.dim() == 2:  # [B, T]: each row writes at its own slots
            index = cache_position[:, None, :, None].expand_as(k)  # (B, n_kv, T, hd)
            self.k.scatter_(2, index, k.to(self.k.dtype))  # (B, n_kv, L, hd)
            self.v.scatter_(2, index, v.to(self.v.dtype))  # (B, n_kv, L, hd)
            return self.k, self.v
        self.k.index_copy_(2, cache_position, k.to(self.k.dtype))  # (B, n_kv, L, hd)
        self.v.index_copy_(2, cache_position, v.to(self.v.dtype))  # (B, n_kv, L, hd)
        return self.k, self.v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, nh, T, hd] over k, v [B, n_kv, L, hd]; causal when mask is None."""
    is_causal = mask is None
    b, nh, t, hd = q.shape
    n_kv = k.shape[1]
    if t == 1 and mask is not None and nh != n_kv:
        # A decode step: the query heads sharing a K/V head become that head's queries,
        # [B, n_kv, groups, hd] against [B, n_kv, L, hd]. Exactly GQA (head h reads K/V head
        # h // groups), and one well-shaped matmul instead of a one-row query per head (much
        # faster on CPU than enable_gqa; docs/performance.md has the figures).
        y = F.scaled_dot_product_attention(q.reshape(b, n_kv, nh // n_kv, hd), k, v,
                                           attn_mask=mask)  # mask [B, 1, 1, L] broadcasts
        return y.view(b, nh, 1, hd)
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, L, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class Attention(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.lm_n_heads, cfg.lm_n_kv_heads
        self.head_dim = cfg.lm_head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        self.qkv = nn.Linear(cfg.lm_hidden_dim, q_dim + 2 * kv_dim, bias=False)
        self.out = nn.Linear(q_dim, cfg.lm_hidden_dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache_position: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_position is not None:
            k, v = self.kv_cache.update(cache_position, k, v)  # (B, n_kv, L, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = _sdpa(q, k, v, mask)  # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.lm_hidden_dim, 2 * cfg.lm_inter_dim, bias=False)
        self.down = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down(F.silu(gate) * up)  # (B, T, D)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache_position: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache_position)  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


def _drop_full_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """An all-ones mask is no mask (lets SDPA use is_causal); skipped while compiling (no sync)."""
    if attention_mask is None or torch.compiler.is_compiling():
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask


class LanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.head_dim = cfg.lm_head_dim
        self.rope_theta = cfg.lm_re_base
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.lm_n_blocks))
        self.norm = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        # Tied: the head *is* the embedding matrix, so it is stored once and never goes stale.
        self.lm_head = None if cfg.lm_tie_weights else nn.Linear(
            cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.cache_max_len: int | None = None
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.token_embedding.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids)  # (B, T, D)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Calls the head module when there is one (same as F.linear for nn.Linear), so an
        # inference-only head such as inference.quantize's weight-only int8 one can replace it.
        if self.lm_head is None:
            return F.linear(hidden, self.token_embedding.weight)  # (B, T, V)
        return self.lm_head(hidden)  # (B, T, V)

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Allocate every block's K/V buffers [batch_size, n_kv, max_len, hd] (zeros)."""
        ref = self.token_embedding.weight
        for block in self.blocks:
            attn = block.attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, max_len, attn.head_dim,
                                    dtype or ref.dtype, device or ref.device)
        self.cache_max_len = max_len

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_max_len = None

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] embeddings -> [B, T, D] final hidden states (after the last norm).

        One path for every mask regime: the mask is turned into a boolean SDPA mask (or None for
        plain causal attention) and default positions, then the same blocks run."""
        b, t, _ = inputs_embeds.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = self._checked_4d_mask(attention_mask, cache_position, b, t)
            key_valid = query_pos = None
        else:
            if cache_position is None:
                key_valid, query_pos, key_len = self._uncached_layout(
                    attention_mask, b, t, inputs_embeds.device)
            else:
                key_valid, query_pos, key_len = self._cached_layout(
                    attention_mask, cache_position, b, t)
            mask = None if cache_position is None and key_valid is None else attention_mask_4d(
                key_valid, query_pos, key_len)
        if position_ids is None:
            position_ids = self._positions(mask, key_valid, query_pos, b, t)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache_position)  # (B, T, D)
        return self.norm(x)

    @staticmethod
    def _checked_4d_mask(mask: torch.Tensor, cache_position: torch.Tensor | None, b: int,
                         t: int) -> torch.Tensor:
        """An explicit boolean mask [B or 1, 1, T, T] (True = may attend), uncached only."""
        if cache_position is not None:
            raise ValueError("a 4-D attention_mask is for uncached forward passes only")
        if mask.dtype != torch.bool or mask.shape[1:] != (1, t, t) or mask.shape[0] not in (1, b):
            raise ValueError(f"a 4-D attention_mask must be boolean [batch, 1, seq, seq] = "
                             f"[{b}, 1, {t}, {t}], got {mask.dtype} {list(mask.shape)}")
        return mask

    def _uncached_layout(self, attention_mask: torch.Tensor | None, b: int, t: int,
                         device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be [batch, seq] = [{b}, {t}] without a cache, "
                             f"got {list(attention_mask.shape)}")
        key_valid = _drop_full_mask(attention_mask)
        query_pos = torch.arange(t, device=device)
        return (None if key_valid is None else key_valid.bool()), query_pos, t

    def _cached_layout(self, attention_mask: torch.Tensor | None, cache_position: torch.Tensor,
                       b: int, t: int) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        max_len = self.cache_max_len
        if max_len is None:
            raise ValueError("cache_position given but no KV cache: call "
                             "setup_cache(batch_size, max_len) first")
        if cache_position.shape not in ((t,), (b, t)):
            raise ValueError(f"cache_position must be [T] = [{t}] or [batch, T] = [{b}, {t}], "
                             f"got {list(cache_position.shape)}")
        if attention_mask is None:
            return None, cache_position, max_len
        shape = tuple(attention_mask.shape)
        if len(shape) != 2 or shape[0] != b or shape[1] > max_len:
            raise ValueError(f"attention_mask with a cache must be [batch, S] with S <= max_len "
                             f"({max_len}), got {list(attention_mask.shape)} for batch {b}")
        key_valid = F.pad(attention_mask.bool(), (0, max_len - attention_mask.shape[1]), value=True)
        return key_valid, cache_position, max_len  # key_valid (B, max_len)

    @staticmethod
    def _positions(mask: torch.Tensor | None, key_valid: torch.Tensor | None,
                   query_pos: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
        """Default positions [B, T]. A 4-D mask: the number of keys a query sees minus one (for
        packing's document mask 0, 1, 2, ... restarting per sample); else counted over the real
        tokens of the 2-D mask, or the cache slots / plain 0..T-1 without one."""
        if query_pos is None:
            return (mask[:, 0].sum(-1) - 1).clamp(min=0).expand(b, t)  # (B, T)
        if key_valid is None:
            return query_pos.expand(b, t)  # (B, T)
        if query_pos.dim() == 2:  # per-row slots
            return positions_from_mask(key_valid).gather(1, query_pos)  # (B, T)
        return positions_from_mask(key_valid).index_select(1, query_pos)  # (B, T)
