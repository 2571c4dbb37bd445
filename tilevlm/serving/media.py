"""Where a request's images come from: `data:` URLs, and `file://` URLs under the directory the
server was given (`--allowed-local-media-path`, as vLLM calls it). Nothing else: the server
never fetches a remote URL on a client's behalf.

What comes back is encoded bytes or a confined path; `load_image` then decides whether it is an
image (and refuses one over the pixel limit from its header)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tilevlm.files import confined
from tilevlm.serving.errors import bad_request


def image_source(url: str, param: str, allowed_dir: Path | None) -> bytes | Path:
    """The bytes of a `data:` URL or the confined path of a `file://` URL; a 400 ApiError for
    anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, param)
    if scheme == "file":
        return _local_file(url, param, allowed_dir)
    if scheme in ("http", "https", "ftp", "ws", "wss"):
        raise bad_request(f"{param}: remote URLs are not fetched by this server; send the image "
                          "as a data: URL (base64)", param, "remote_url_refused")
    raise bad_request(f"{param}: expected a data: URL (or a file:// URL under the server's "
                      f"allowed local media path), got {url[:40]!r}", param)


def _data_url(url: str, param: str) -> bytes:
    """`data:[<media type>][;base64],<data>`: only base64 images."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: a data: URL needs a ',' before its data", param)
    parts = [p.strip().lower() for p in header.split(";")]
    media_type = parts[0]
    if media_type and not media_type.startswith("image/"):
        raise bad_request(f"{param}: the data: URL holds {media_type!r}, not an image", param,
                          "not_an_image")
    if "base64" not in parts[1:]:
        raise bad_request(f"{param}: only base64 data: URLs are read "
                          "(data:image/png;base64,...)", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL's base64 is invalid", param) from None
    if not data:
        raise bad_request(f"{param}: the data: URL holds no data", param, "not_an_image")
    return data


def _local_file(url: str, param: str, allowed_dir: Path | None) -> Path:
    if allowed_dir is None:
        raise bad_request(f"{param}: local files are not served (start the server with "
                          "--allowed-local-media-path DIR to allow files under DIR)", param,
                          "local_file_refused")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{param}: a file:// URL on another host is not read", param,
                          "remote_url_refused")
    try:
        return confined(allowed_dir, unquote(parts.path), f"{param}'s file",
                        "the allowed local media path")
    except ValueError as e:
        raise bad_request(str(e), param, "local_file_refused") from None
