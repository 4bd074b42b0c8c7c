"""Loading the user's own images (`--image PATH_OR_URL`): local files and http(s) URLs.

>>> load_images(["cat.jpg", "https://example.org/dog.png"])
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, first_line

__all__ = ["FETCH_TIMEOUT_S", "MAX_IMAGE_BYTES", "load_image", "load_images"]

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT_S = 15.0
# Servers that do not know what they serve; PIL decoding has the last word on these.
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")


def load_image(
    source: str | os.PathLike,
    *,
    timeout: float = FETCH_TIMEOUT_S,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """Read a local image file or fetch an http(s) URL, decode it and return it upright, RGB.

    Args:
        source: a file path or an `http://` / `https://` URL.
        timeout: seconds for connecting and for each read of a URL.
        max_bytes: the largest file or download accepted.

    Returns:
        The decoded image, EXIF orientation applied, converted to RGB (as timm's loader does).

    Raises:
        ImageLoadError: missing file, HTTP error, timeout, too large, not an image.

    Example:
        >>> load_image("http://127.0.0.1:8000/cat.png").size
        (640, 480)
    """
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        data = _fetch(text, timeout=timeout, max_bytes=max_bytes)
    else:
        data = _read(Path(text), max_bytes=max_bytes)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{text}: not a decodable image ({first_line(e)})") from e
    logger.info("loaded %s (%dx%d)", text, *image.size)
    return image


def load_images(sources: Sequence[str | os.PathLike], **kwargs) -> list[Image.Image]:
    """`load_image` for each source, in order; the first failure raises `ImageLoadError`."""
    return [load_image(s, **kwargs) for s in sources]


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageLoadError(f"{path}: {size} bytes, more than the {max_bytes} accepted")
        return path.read_bytes()
    except ImageLoadError:
        raise
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read ({first_line(e)})") from e


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    import requests

    try:
        with requests.get(url, timeout=timeout, stream=True) as r:
            if r.status_code >= 400:
                raise ImageLoadError(f"{url}: HTTP {r.status_code} {r.reason}".rstrip())
            ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith("image/") and ctype not in _GENERIC_TYPES:
                raise ImageLoadError(f"{url}: not an image (Content-Type {ctype})")
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"{url}: {length} bytes, more than the {max_bytes} accepted")
            data = bytearray()
            for chunk in r.iter_content(chunk_size=1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageLoadError(f"{url}: more than the {max_bytes} bytes accepted")
            return bytes(data)
    except requests.RequestException as e:
        raise ImageLoadError(f"{url}: cannot fetch ({type(e).__name__})") from e
