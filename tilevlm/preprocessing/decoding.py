"""The one boundary around decoding untrusted image bytes.

Image files come from users and datasets, and Pillow's decoders fail on hostile input in many
ways (`struct.error` from a malformed EXIF tag, `OverflowError` from a huge TIFF strip offset,
`IndexError`, `MemoryError`, ...). No hand-picked list of exception types is complete, so the rule
is by *where* the exception was raised: anything raised inside Pillow (the decoder, called from
our code) is a bad image, an `ImageLoadError` naming the input; an exception raised by tilevlm's
own code is a bug and propagates unchanged.

libtiff, which Pillow calls for compressed TIFF, prints its errors and warnings straight to the
process's stderr (bypassing Python); its default handlers are switched off at import, since
Pillow reports the same failures as exceptions, which the boundary turns into one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import stat
import traceback
from pathlib import Path
from typing import Iterator

import PIL
from PIL import Image

_PIL_DIR = os.path.dirname(os.path.abspath(PIL.__file__)) + os.sep
_OUR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _quiet_libtiff() -> None:
    """Unset libtiff's default error and warning handlers (they write to fd 2), where the
    library can be found among the loaded ones (Linux); elsewhere nothing changes."""
    import PIL._imaging  # noqa: F401  (loads Pillow's libtiff)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libtiff" in line}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                setter(None)


_quiet_libtiff()


class ImageLoadError(ValueError):
    """An image that cannot be used; the message starts with the input's name."""


@contextlib.contextmanager
def decoding(name: str, what: str = "truncated or corrupt image") -> Iterator[None]:
    """Within the block, a failure inside Pillow becomes `ImageLoadError("NAME: WHAT (...)")`."""
    try:
        yield
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image (unknown or unsupported format)") from None
    except Exception as e:
        if not raised_in_decoder(e):
            raise
        raise ImageLoadError(f"{name}: {what} ({type(e).__name__}: {e})") from None


def raised_in_decoder(error: BaseException) -> bool:
    """True when the innermost frame of our own code that `error` passed through called into
    Pillow (the decoder failed), False when our code raised it or called something else."""
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    ours = [i for i, f in enumerate(files) if f.startswith(_OUR_DIR)]
    below = files[ours[-1] + 1:] if ours else files
    return bool(below) and below[0].startswith(_PIL_DIR)


def image_file(source: str | Path | bytes, name: str) -> Path | io.BytesIO:
    """A regular, non-empty file (never a FIFO or a device, which could block forever), or the
    bytes wrapped in a file object; an ImageLoadError otherwise."""
    if not isinstance(source, (str, Path)):
        if not isinstance(source, (bytes, bytearray, memoryview)):
            raise ImageLoadError(f"{name}: expected a path or encoded bytes, got a "
                                 f"{type(source).__name__}")
        if len(source) == 0:
            raise ImageLoadError(f"{name}: empty data, not an image")
        return io.BytesIO(bytes(source))
    path = Path(source)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: file not found") from None
    except OSError as e:
        raise ImageLoadError(f"{name}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(f"{name}: not a file")
    if info.st_size == 0:
        raise ImageLoadError(f"{name}: empty file, not an image")
    return path
