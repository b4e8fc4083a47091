"""Downloading one file: streamed, hashed while it arrives, with a progress bar and errors
that say what to do offline.

:func:`as_url` turns a URL or a local path into something ``urllib`` opens (``http(s)://`` or
``file://``); :func:`stream_into` streams it into an open file and returns the byte count and
SHA-256. The caller (:func:`regpipe.weights.fetch`) owns the temporary file, the size and
checksum checks and the atomic rename: nothing here decides what a good file is.

Example
-------
>>> import io, pathlib, tempfile
>>> source = pathlib.Path(tempfile.mkdtemp()) / "hello.txt"
>>> _ = source.write_bytes(b"hello")
>>> buffer = io.BytesIO()
>>> written, digest = stream_into(as_url(str(source)), buffer, target=source, label="demo",
...                               progress=False)
>>> written, digest[:12]
(5, '2cf24dba5fb0')
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from regpipe.errors import WeightsError

__all__ = ["as_url", "stream_into"]

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0


def as_url(source: str) -> str:
    """Return ``source`` as a URL; an existing local path becomes a ``file://`` URL."""
    if urllib.parse.urlsplit(source).scheme in ("http", "https", "file"):
        return source
    if Path(source).expanduser().is_file():
        return Path(source).expanduser().resolve().as_uri()
    raise WeightsError(
        f"cannot download from {source!r}: not an http(s):// or file:// URL nor an existing file"
    )


def _network_error(source: str, target: Path, detail: object) -> WeightsError:
    if urllib.parse.urlsplit(source).scheme == "file":
        return WeightsError(f"cannot read {source}: {detail}")
    return WeightsError(
        f"could not download {source} ({detail}); we are probably offline or behind a "
        f"firewall: download the file on a machine with internet access and put it at {target}"
    )


def stream_into(
    source: str, out: IO[bytes], *, target: Path, label: str, approx_size: int | None = None,
    progress: bool = True,
) -> tuple[int, str]:
    """Stream the URL ``source`` into the open file ``out``; return (bytes written, sha256 hex).

    ``target`` is where the caller will put the file (named in error messages, which say how to
    place it by hand); ``label`` and ``approx_size`` (bytes, when the server sends no length)
    drive the progress bar. A response shorter than its ``Content-Length`` is an error.

    Raises
    ------
    WeightsError
        HTTP errors, network failures or a lost connection (the message says what to do
        offline), and write errors.
    """
    request = urllib.request.Request(source, headers={"User-Agent": "regpipe-weights"})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise WeightsError(
            f"downloading {source} failed: HTTP {exc.code} {exc.reason}; check the URL, or put "
            f"the file at {target} by hand"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(source, target, getattr(exc, "reason", exc)) from None
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    digest = hashlib.sha256()
    written = 0
    bar = tqdm(
        total=expected or approx_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
    )
    with response, bar:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (http.client.HTTPException, OSError) as exc:
                raise _network_error(source, target, f"connection lost: {exc}") from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise WeightsError(f"cannot write into {target.parent}: {exc}") from None
            digest.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    if expected is not None and written != expected:
        raise _network_error(source, target, f"interrupted after {written} of {expected} bytes")
    return written, digest.hexdigest()
