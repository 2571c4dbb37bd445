"""The server's options and limits, in one place: every limit has a default here, and
`tilevlm serve` makes each one an option with this default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    model_name: str = "tilevlm"  # the `model` id clients name
    max_batch: int = 8  # rows decoding together
    max_queue: int = 32  # requests waiting for a row beyond those; more: 429 at once
    max_prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (>= 1 request)
    max_tokens: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int = 256  # when a request names none (capped by the positions left)
    max_context: int | None = None  # prompt + new tokens of one request; None: the model's
    max_body_bytes: int = 20 * 1024 * 1024  # a request's JSON body (data: images included)
    max_images: int = 4  # images in one request
    max_image_pixels: int = 16 * 1024 * 1024  # width x height of one image (from its header)
    max_messages: int = 256  # messages in one request
    max_stop: int = 4  # stop texts (OpenAI's limit)
    allowed_local_media_path: Path | None = None  # file:// images only under it; None: none
    retry_after: int = 1  # seconds, the Retry-After of a 429 or 503

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prefill_tokens", "max_tokens", "default_max_tokens",
                     "max_body_bytes",
                     "max_image_pixels", "max_messages", "retry_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        for name in ("max_queue", "max_images", "max_stop"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, "
                                 f"got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max-context must be >= 2, got {self.max_context}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api-key must not be empty")

    @property
    def exposed(self) -> bool:
        """Bound to more than this machine's loopback."""
        return self.host not in LOOPBACK_HOSTS
