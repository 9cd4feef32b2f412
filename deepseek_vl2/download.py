"""Fetching an image URL within bounds of time and size (the Cog server's URL inputs, the batch's images).

A server that never answers, trickles bytes or sends an endless body must not hold a request (or fill the
disk): connecting and each wait for the next bytes take at most ``silence_s``, the whole download at most
``timeout_s`` (checked between reads, so the worst case is that plus one silent wait), the body at most
``max_bytes`` (a 40-megapixel PNG photo is 50-80 MB; the decoder's pixel limit, 89 megapixels, would be
about 270 MB uncompressed, which no sensible upload is).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

__all__ = ["DownloadError", "fetch_image", "SILENCE_S", "TIMEOUT_S", "MAX_BYTES"]

SILENCE_S = 10.0
TIMEOUT_S = 60.0
MAX_BYTES = 128 << 20


class DownloadError(ValueError):
    """An image URL that cannot be fetched within the bounds; the message says why."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def fetch_image(url: str, suffix: str = "", *, silence_s: float = SILENCE_S, timeout_s: float = TIMEOUT_S,
                max_bytes: int = MAX_BYTES, user_agent: Optional[str] = None) -> str:
    """Fetch ``url`` into a new temp file (its path is returned; the caller removes it) within the bounds
    above, else raise ``DownloadError`` (the partial file removed)."""
    import requests
    import urllib3

    headers = {"User-Agent": user_agent} if user_agent else {}
    deadline = time.monotonic() + timeout_s
    try:
        resp = requests.get(url, stream=True, timeout=(silence_s, silence_s), headers=headers)
    except requests.Timeout:
        raise DownloadError(f"the server did not answer within {silence_s:.0f} s") from None
    except requests.ConnectionError:
        raise DownloadError("the server cannot be reached") from None
    except requests.RequestException as exc:
        raise DownloadError(f"the request failed ({exc.__class__.__name__})") from None
    with resp:
        if resp.status_code >= 400:
            raise DownloadError(f"HTTP {resp.status_code} {resp.reason or ''}".rstrip())
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise DownloadError(f"the file is {_mib(int(declared))}, more than the limit of {_mib(max_bytes)}")
        resp.raw.decode_content = True
        dest = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
        size = 0
        try:
            with dest:
                while True:
                    if time.monotonic() > deadline:
                        raise DownloadError(f"the download took longer than {timeout_s:.0f} s "
                                            f"({_mib(size)} received)")
                    # read1: whatever has arrived, so that a trickle cannot hold one read past the deadline
                    chunk = resp.raw.read1(1 << 16)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadError(f"the file is larger than the limit of {_mib(max_bytes)}")
                    dest.write(chunk)
        except (urllib3.exceptions.ReadTimeoutError, requests.Timeout):
            os.unlink(dest.name)
            raise DownloadError(f"the server stopped sending for {silence_s:.0f} s") from None
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            os.unlink(dest.name)
            raise DownloadError(f"the download broke off ({exc.__class__.__name__})") from None
        except BaseException:
            os.unlink(dest.name)
            raise
    return dest.name
