"""Network weights: a registry of named checkpoints, a local cache, download and verification.

A checkpoint is named either by a registry name (``"unigradicon"``, ``"multigradicon"``, or a
model shipped inside the package once one exists) or by a file path. Registry files live in a
cache folder, ``<cache>/<name>/<filename>``, where ``<cache>`` is

1. ``$REGPIPE_HOME/weights`` when ``REGPIPE_HOME`` is set,
2. else ``$XDG_CACHE_HOME/regpipe/weights`` when ``XDG_CACHE_HOME`` is set,
3. else ``~/.cache/regpipe/weights``.

Nothing is downloaded unless asked for (:func:`fetch`, or :func:`resolve_weights` with
``download=True``); ``REGPIPE_OFFLINE=1`` forbids downloading altogether. A missing checkpoint
fails at once with a message that names the URL and the exact path to put the file at, so a
machine without internet access can be served by copying the file there by hand.

Checkpoints are only ever read with ``torch.load(..., weights_only=True)`` (in
:mod:`regpipe.networks.checkpoint`, which also knows the file layouts): tensors and plain
containers, never arbitrary pickled objects. This module finds files; it does not build networks.

Example
-------
>>> from regpipe.weights import resolve_weights
>>> path = resolve_weights("unigradicon")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regpipe.atomic import atomic_write_text
from regpipe.download import as_url, stream_into
from regpipe.errors import InputError, WeightsError

LOGGER = logging.getLogger("regpipe")

__all__ = [
    "ENV_HOME",
    "ENV_OFFLINE",
    "VerifyResult",
    "WeightsEntry",
    "bundled_dir",
    "cache_dir",
    "cached_path",
    "default_weights_name",
    "fetch",
    "get_entry",
    "is_offline",
    "list_entries",
    "register_entry",
    "resolve_weights",
    "sha256sum",
    "sidecar_path",
    "unregister_entry",
    "verify",
    "weights_path",
]

ENV_HOME = "REGPIPE_HOME"
"""Environment variable: regpipe's data folder; weights are cached in its ``weights/``."""

ENV_OFFLINE = "REGPIPE_OFFLINE"
"""Environment variable: ``1``/``true``/``yes``/``on`` forbids every download."""

_CHUNK_BYTES = 1 << 20
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LFS_HEADER = b"version https://git-lfs"


@dataclass(frozen=True)
class WeightsEntry:
    """One named checkpoint of the registry.

    Parameters
    ----------
    name:
        Registry name: lower-case letters, digits, ``_`` and ``-`` (no dots or slashes, so a
        name is never mistaken for a file path).
    url:
        Download source (``https://``, ``http://`` or ``file://``); ``None`` for a bundled file
        that cannot be downloaded.
    filename:
        File name inside ``<cache>/<name>/`` (or inside :func:`bundled_dir` when bundled).
    size:
        Exact expected size in bytes, checked after download; ``None`` when not known.
    sha256:
        Expected SHA-256 (64 lower-case hex digits), checked after download; ``None`` when not
        known, in which case the digest computed at download is recorded in a sidecar file.
    description:
        One line for ``regpipe-weights list``.
    licence:
        Licence of the weights, as far as known.
    bundled:
        ``True`` when the file ships inside the package under ``regpipe/data/weights/``.
    config:
        Name of the network configuration the state dict fits.
    approx_size:
        Approximate size in bytes, for progress bars and messages only; never checked.
    """

    name: str
    url: str | None
    filename: str
    size: int | None = None
    sha256: str | None = None
    description: str = ""
    licence: str = "unknown"
    bundled: bool = False
    config: str = "unigradicon"
    approx_size: int | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InputError(
                f"weights name {self.name!r} is invalid: use lower-case letters, digits, '_' "
                "and '-', starting with a letter or digit"
            )
        if not self.filename or Path(self.filename).name != self.filename:
            raise InputError(f"weights filename {self.filename!r} must be a plain file name")
        if self.size is not None and self.size <= 0:
            raise InputError(f"weights size must be a positive number of bytes, not {self.size}")
        if self.sha256 is not None:
            if not _SHA256_RE.match(self.sha256.lower()):
                raise InputError(f"sha256 {self.sha256!r} is not 64 hexadecimal digits")
            object.__setattr__(self, "sha256", self.sha256.lower())
        if self.url is None and not self.bundled:
            raise InputError(f"weights {self.name!r} need a url unless they are bundled")


_GITHUB_RELEASES = "https://github.com/uncbiag/uniGradICON/releases/download"
_CHECKPOINT_BYTES_ESTIMATE = 282_805_197  # torch 2.13 re-save of the 188-key state dict

_REGISTRY: dict[str, WeightsEntry] = {}


def register_entry(entry: WeightsEntry, *, replace: bool = False) -> WeightsEntry:
    """Add ``entry`` to the registry and return it.

    Raises :class:`~regpipe.errors.InputError` when the name is taken and ``replace`` is
    ``False``. A bundled entry whose file exists in :func:`bundled_dir` becomes the default
    (see :func:`default_weights_name`).
    """
    if entry.name in _REGISTRY and not replace:
        raise InputError(f"weights name {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_entry(name: str) -> None:
    """Remove ``name`` from the registry (no error when absent)."""
    _REGISTRY.pop(name, None)


register_entry(
    WeightsEntry(
        name="regpipe-compact",
        url=None,
        filename="regpipe-compact.pt",
        # recorded so that `regpipe-weights verify` detects a damaged installation; update
        # both with the file (tests/test_weights.py checks them)
        size=12858793,
        sha256="124e31ec0ebfcb6f5347e12ccd66c7f5210ddc7bf03968ddec67159c0f219fb7",
        description="regpipe's compact GradICON model, bundled (see regpipe-compact.md)",
        licence="Apache-2.0 (trained by the regpipe authors)",
        bundled=True,
        config="compact",
    )
)
register_entry(
    WeightsEntry(
        name="regpipe-conditional",
        url=None,
        filename="regpipe-conditional.pt",
        size=12893431,
        sha256="be9bb89da45470d59c8a162257eab2d0172b0f9b6a55122941865350deddd201",
        description="conditional (region, pair type, smoothness) compact model, bundled",
        licence="Apache-2.0 (trained by the regpipe authors)",
        bundled=True,
        config="compact-conditional",
    )
)
register_entry(
    WeightsEntry(
        name="unigradicon",
        url=f"{_GITHUB_RELEASES}/unigradicon_weights/Step_2_final.trch",
        filename="Step_2_final.trch",
        description="uniGradICON foundation model (Tian et al., 2024), step 2",
        licence="MIT (unigradicon package metadata; no separate weights licence stated)",
        approx_size=_CHECKPOINT_BYTES_ESTIMATE,
    )
)
register_entry(
    WeightsEntry(
        name="multigradicon",
        url=f"{_GITHUB_RELEASES}/multigradicon_weights/Step_2_final.trch",
        filename="Step_2_final.trch",
        description="multiGradICON multimodal model (Demir et al., 2024), step 2",
        licence="MIT (unigradicon package metadata; no separate weights licence stated)",
        approx_size=_CHECKPOINT_BYTES_ESTIMATE,
    )
)


def list_entries() -> list[WeightsEntry]:
    """Return the registry entries in registration order."""
    return list(_REGISTRY.values())


def get_entry(name: str) -> WeightsEntry:
    """Return the entry called ``name``; :class:`~regpipe.errors.WeightsError` when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise WeightsError(
            f"unknown weights name {name!r}; known names: {known} (or give a file path)"
        ) from None


def bundled_dir() -> Path:
    """Return the folder of checkpoints shipped inside the package (``regpipe/data/weights``)."""
    return Path(__file__).resolve().parent / "data" / "weights"


def default_weights_name() -> str:
    """Return the default checkpoint: the bundled model when its file exists, else uniGradICON."""
    for entry in _REGISTRY.values():
        if entry.bundled and _is_usable(bundled_dir() / entry.filename):
            return entry.name
    return "unigradicon"


def cache_dir() -> Path:
    """Return the weights cache folder (not created); see the module docstring for the order."""
    home = os.environ.get(ENV_HOME)
    if home:  # absolute: the cache must not depend on the folder a command starts in
        return Path(home).expanduser().absolute() / "weights"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser().absolute() if xdg else Path.home() / ".cache"
    return base / "regpipe" / "weights"


def cached_path(name: str) -> Path:
    """Return ``<cache>/<name>/<filename>`` for registry name ``name`` (it may not exist)."""
    entry = get_entry(name)
    return cache_dir() / entry.name / entry.filename


def weights_path(name: str) -> Path:
    """Return where registry ``name`` lives: its bundled file if present, else the cache path
    (for a bundled entry whose packaged file is missing, a copy fetched with ``url``)."""
    entry = get_entry(name)
    if entry.bundled:
        bundled = bundled_dir() / entry.filename
        if _is_usable(bundled):
            return bundled
        if entry.url is None and not _is_usable(cached_path(name)):
            return bundled  # missing: the error names the file the package should have
    return cached_path(name)


def sidecar_path(path: Path) -> Path:
    """Return the checksum sidecar of ``path``: ``<path>.sha256`` (``sha256sum`` format)."""
    return path.with_name(path.name + ".sha256")


def is_offline() -> bool:
    """Return ``True`` when ``REGPIPE_OFFLINE`` forbids downloads."""
    value = os.environ.get(ENV_OFFLINE, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def sha256sum(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 of the file at ``path`` as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _is_usable(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or os.sep in value
        or value.startswith("~")
        or Path(value).suffix != ""
        or os.path.lexists(value)
    )


def _check_file(path: Path) -> Path:
    """Return ``path`` when it is a non-empty regular file; raise WeightsError otherwise."""
    if path.is_symlink() and not path.exists():
        raise WeightsError(
            f"weights file {path} is a dangling symbolic link (to {os.readlink(path)}); "
            "if it is a git-annex pointer, run `git annex get` on it first"
        )
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes): an interrupted copy?")
    if size < 1024:
        with open(path, "rb") as handle:
            if handle.read(len(_LFS_HEADER)) == _LFS_HEADER:
                raise WeightsError(
                    f"weights file {path} is a Git LFS pointer, not the checkpoint; "
                    "run `git lfs pull` first"
                )
    return path


def _missing_message(entry: WeightsEntry, target: Path, why: str) -> str:
    approx = f" (about {entry.approx_size / 1e6:.0f} MB)" if entry.approx_size else ""
    return (
        f"weights {entry.name!r} are not at {target} and {why}; download {entry.url}{approx} "
        f"on a machine with internet access and put it at {target}, or run "
        f"`regpipe-weights fetch {entry.name}` (set {ENV_HOME} to use another folder)"
    )


def resolve_weights(
    name_or_path: str | os.PathLike[str], download: bool = False, progress: bool = True
) -> Path:
    """Return the checkpoint file for a registry name or a file path.

    Parameters
    ----------
    name_or_path:
        A registry name (see :func:`list_entries`; a name wins over a same-named file in the
        working folder, write ``./name`` for the file) or a path to a checkpoint file.
    download:
        When ``True``, a registry checkpoint missing from the cache is fetched (unless
        ``REGPIPE_OFFLINE`` is set); when ``False`` (default) a missing one is an error.
    progress:
        Show a tqdm progress bar while downloading.

    Returns
    -------
    Path
        An existing, non-empty file; a path argument is returned as given (``~`` expanded).

    Raises
    ------
    WeightsError
        Unknown name; a path that is missing, empty, a dangling symlink (git-annex pointer) or
        a Git LFS pointer; a missing registry checkpoint that may not or cannot be downloaded
        (the message names the URL and the exact path to put the file at).
    """
    if isinstance(name_or_path, os.PathLike) or (
        name_or_path not in _REGISTRY and _looks_like_path(name_or_path)
    ):
        return _check_file(Path(name_or_path).expanduser())
    entry = get_entry(name_or_path)
    target = weights_path(entry.name)
    if _is_usable(target):
        return _check_file(target)
    if (target.exists() or target.is_symlink()) and not download:
        _check_file(target)  # raises with the precise reason (empty file, dangling link)
    if entry.url is None:
        raise WeightsError(f"bundled weights {entry.name!r} are missing from {target}")
    if not download:
        raise WeightsError(_missing_message(entry, target, "downloading was not requested"))
    if is_offline():
        raise WeightsError(_missing_message(entry, target, f"{ENV_OFFLINE} forbids downloads"))
    return fetch(entry.name, progress=progress)  # an unusable file is not kept as cached


def _check_download(entry: WeightsEntry, source: str, written: int, digest: str) -> None:
    if written == 0:
        raise WeightsError(f"{source} returned no data; nothing was saved")
    if entry.size is not None and written != entry.size:
        raise WeightsError(
            f"{source} gave {written} bytes but {entry.name!r} should be {entry.size} bytes; "
            "nothing was saved"
        )
    if entry.sha256 is not None and digest != entry.sha256:
        raise WeightsError(
            f"checksum mismatch for {source}: sha256 {digest}, expected {entry.sha256}; "
            "the download is corrupt or the file changed upstream; nothing was saved"
        )


def fetch(name: str, force: bool = False, url: str | None = None, progress: bool = True) -> Path:
    """Download registry checkpoint ``name`` into the cache and return its path.

    The file is streamed into a temporary file in the destination folder, checked (byte count
    against ``Content-Length``, then the entry's ``size`` and ``sha256`` when known) and only
    then renamed atomically to ``<cache>/<name>/<filename>``; a failed or interrupted download
    never leaves a file under the final name. The SHA-256 computed during download is written
    to the sidecar ``<filename>.sha256`` for later :func:`verify` runs.

    A cached file is kept when it is complete: of the registry's size and SHA-256 when known,
    else matching its sidecar; one that is not (a copy interrupted by hand) is downloaded again.
    Processes fetching the same name into one cache (array jobs) take turns on a lock file
    next to it, so the file is downloaded once and the others find it cached.

    Parameters
    ----------
    name:
        Registry name (see :func:`list_entries`).
    force:
        Download even when a complete cached file exists (it is replaced only on success).
    url:
        Download from this ``http(s)://`` or ``file://`` URL (or local file path) instead of
        the registry URL, e.g. a mirror; the entry's size and checksum still apply.
    progress:
        Show a tqdm progress bar (on stderr).

    Raises
    ------
    WeightsError
        Unknown name, ``REGPIPE_OFFLINE`` set, network or HTTP failure (the message says how
        to place the file by hand), size or checksum mismatch, unwritable cache folder.
    """
    entry = get_entry(name)
    target = cached_path(name)
    source = url if url is not None else entry.url
    if source is None:
        where = bundled_dir() / entry.filename
        raise WeightsError(
            f"weights {name!r} are bundled with regpipe ({where}): nothing to fetch"
            if entry.bundled else f"weights {name!r} have no download URL; give one (--url)")
    source = as_url(source)
    local = urllib.parse.urlsplit(source).scheme == "file"
    _remove_stale_parts(target.parent, entry.filename)
    if not force and _is_cached(target, entry):
        if url is not None:
            LOGGER.warning("%s is already in the cache; --force downloads it again from %s",
                           target, source)
        return target
    if is_offline() and not local:  # a file:// copy (a USB stick, a shared folder) is no download
        raise WeightsError(
            f"{ENV_OFFLINE} is set, so {source} is not downloaded; put the file at {target} "
            f"by hand, fetch it from a local copy (--url /path/to/{entry.filename}) or unset "
            f"{ENV_OFFLINE}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(target.parent, exc) from None
    with _fetch_lock(target):
        # another process may have fetched the file while this one waited for the lock
        if not force and _is_cached(target, entry):
            return target
        if force and _is_usable(target):
            LOGGER.info("--force: downloading %s again", target)
        return _download(entry, source, target, progress)


def _download(entry: WeightsEntry, source: str, target: Path, progress: bool) -> Path:
    """Stream ``source`` into a temporary file next to ``target``, check it, rename it."""
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{entry.filename}.", suffix=".part", dir=target.parent
        )
    except OSError as exc:
        raise _unwritable(target.parent, exc) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            written, digest = stream_into(source, out, target=target, label=f"fetch {entry.name}",
                                          approx_size=entry.approx_size, progress=progress)
            try:  # a full disk or a quota often shows only here (NFS, Lustre)
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise _unwritable(target.parent, exc) from None
        _check_download(entry, source, written, digest)
        try:  # what registration will do with it: build the network and load it strictly
            _check_loads(tmp, entry)
        except WeightsError as exc:
            raise WeightsError(f"{source} did not give usable weights ({exc}); nothing was "
                               "saved") from None
        try:
            os.chmod(tmp, 0o644)
            sidecar = sidecar_path(target)
            sidecar.unlink(missing_ok=True)
            os.replace(tmp, target)
            _write_sidecar(sidecar, digest, entry.filename)
        except OSError as exc:
            raise _unwritable(target.parent, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _unwritable(folder: Path, exc: OSError) -> WeightsError:
    return WeightsError(
        f"cannot write to the weights cache {folder}: {exc.strerror or exc}; free some space "
        f"or set {ENV_HOME} to a writable folder with room for the file"
    )


def _is_cached(target: Path, entry: WeightsEntry) -> bool:
    """Whether ``target`` holds a complete copy of ``entry``: non-empty, of the registry's size
    when known, and matching the registry's SHA-256 or, failing that, its sidecar's. A file
    that fails (a copy interrupted by hand, a damaged disk) is logged and downloaded again."""
    if not _is_usable(target):
        return False
    size = target.stat().st_size
    if entry.size is not None and size != entry.size:
        problem = f"{size} bytes instead of {entry.size}"
    else:
        try:
            expected = entry.sha256 or _read_sidecar(sidecar_path(target))
        except WeightsError:
            expected = None  # a malformed sidecar is replaced by the next download
        if expected is None or sha256sum(target) == expected:
            return True
        recorded = f"the one recorded in {sidecar_path(target).name}"
        problem = "its SHA-256 does not match " + (
            "the registry's" if entry.sha256 else recorded)
    LOGGER.warning("the cached %s is damaged (%s): downloading it again", target, problem)
    return False


@contextlib.contextmanager
def _fetch_lock(target: Path):
    """Hold ``<cache>/.<name>.lock`` (``fcntl.flock``, outside the model's folder) while
    downloading ``target`` (``<cache>/<name>/<filename>``), so that
    array jobs fetching the same weights into a shared cache download it once: the others wait
    and then find it cached. Where the file system has no ``flock`` (Lustre without the flock
    mount option, NFS with ``nolock``) each downloads on its own (still atomic). Partial
    files are only removed once stale even so: a lock local to one node (NFS ``local_lock``)
    does not keep out another node's fetch."""
    import errno
    import fcntl

    try:
        handle = open(target.parent.with_name(f".{target.parent.name}.lock"), "a+b")
    except OSError as exc:
        raise _unwritable(target.parent, exc) from None
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                LOGGER.warning("another process is fetching %s; waiting for it", target)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            LOGGER.debug("cannot lock %s (%s); downloading without a lock", target, exc)
        yield


#: A partial download untouched for this long belongs to no running fetch (those write
#: continuously): a killed one (SIGKILL, a node crash), removed by the next fetch.
STALE_PART_SECONDS = 600


def _remove_stale_parts(folder: Path, filename: str) -> None:
    now = time.time()
    for part in folder.glob(f".{filename}.*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
                LOGGER.info("removed %s, left by an interrupted download", part)
        except OSError:  # another fetch removed it, or the folder is read-only
            pass


def _write_sidecar(sidecar: Path, digest: str, filename: str) -> None:
    atomic_write_text(sidecar, f"{digest}  {filename}\n")


def _read_sidecar(sidecar: Path) -> str | None:
    """Return the digest recorded in ``sidecar``, ``None`` when absent; WeightsError if bad."""
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(encoding="ascii", errors="replace").split()
    if not fields or not _SHA256_RE.match(fields[0].lower()):
        raise WeightsError(f"checksum sidecar {sidecar} is malformed")
    return fields[0].lower()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``size`` is in bytes; ``sha256_reference`` says where ``expected_sha256`` came from
    (``"registry"``, ``"sidecar"`` or ``None`` when nothing to compare with); ``*_matches`` is
    ``None`` when there was nothing to compare with; ``problems`` lists every failure found.
    """

    path: Path
    name: str | None
    exists: bool
    size: int | None = None
    sha256: str | None = None
    expected_size: int | None = None
    expected_sha256: str | None = None
    sha256_reference: str | None = None
    size_matches: bool | None = None
    sha256_matches: bool | None = None
    loads: bool = False
    n_tensors: int = 0
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """``True`` when the file exists, matches what is expected and loads into the network
        it describes."""
        return not self.problems


def _official_architecture() -> Any:  # a NetworkConfig (networks is imported lazily)
    from regpipe.networks import NetworkConfig

    return NetworkConfig.unigradicon()


#: The architecture a registry ``config`` name stands for where it is fixed (the official
#: models): a file fetched or verified under such an entry must hold it.
ARCHITECTURES: dict[str, Callable[[], Any]] = {"unigradicon": _official_architecture}


def _check_loads(path: Path, entry: WeightsEntry | None = None) -> int:
    """Build the network ``path`` describes and load it strictly, as registration does;
    return its number of tensors. For a registry ``entry`` of an official model, the file
    must hold that architecture (another model saved under its name is refused).

    Both layouts are accepted (a bare state dict, or regpipe's ``{"state_dict", "config",
    "card"}``), always via ``torch.load(..., weights_only=True)``; a file that loads but fits
    no network raises :class:`~regpipe.errors.WeightsError` listing the missing and unexpected
    keys.
    """
    from regpipe.networks.checkpoint import network_from_file
    from regpipe.networks.conditional import is_conditional

    network = network_from_file(path)
    expected = ARCHITECTURES.get(entry.config) if entry is not None else None
    if entry is not None and expected is not None and (
            is_conditional(network) or network.config != expected()):
        raise WeightsError(
            f"{path} holds a {network.config.grid_shape[0]}^3 network with "
            f"{sum(p.numel() for p in network.parameters()):,} parameters, not the "
            f"uniGradICON architecture of {entry.name!r}: another model's weights?")
    return len(network.state_dict())


def verify(name_or_path: str | os.PathLike[str]) -> VerifyResult:
    """Check a checkpoint: existence, size, SHA-256, and that it loads into its network.

    Loading uses :func:`regpipe.networks.checkpoint.read_checkpoint` (``weights_only=True``),
    so both the official bare state dict and regpipe's own layout are accepted.

    The SHA-256 is compared with the registry's when known, else with the sidecar
    ``<file>.sha256`` recorded at download (detecting later corruption), if there is one.
    Problems are reported in the result, not raised; only an unknown name raises
    :class:`~regpipe.errors.WeightsError`.
    """
    entry: WeightsEntry | None = None
    if isinstance(name_or_path, os.PathLike) or (
        name_or_path not in _REGISTRY and _looks_like_path(name_or_path)
    ):
        path = Path(name_or_path).expanduser()
    else:
        entry = get_entry(name_or_path)
        path = weights_path(entry.name)
    name = entry.name if entry else None
    try:
        _check_file(path)
    except WeightsError as exc:
        exists = path.is_file()
        problem = str(exc)
        if entry is not None and not path.is_symlink() and not exists and entry.url:
            problem = _missing_message(entry, path, "nothing was fetched there")
        size = path.stat().st_size if exists else None
        return VerifyResult(path, name, exists=exists, size=size, problems=(problem,))
    problems: list[str] = []
    size = path.stat().st_size
    digest = sha256sum(path)
    expected_size = entry.size if entry else None
    expected_sha: str | None = entry.sha256 if entry else None
    reference = "registry" if expected_sha else None
    if expected_sha is None:
        try:
            expected_sha = _read_sidecar(sidecar_path(path))
            reference = "sidecar" if expected_sha else None
        except WeightsError as exc:
            problems.append(str(exc))
    size_ok = None if expected_size is None else size == expected_size
    if size_ok is False:
        problems.append(f"{path} is {size} bytes, expected {expected_size}")
    sha_ok = None if expected_sha is None else digest == expected_sha
    if sha_ok is False:
        problems.append(
            f"{path} has sha256 {digest} but the {reference} says {expected_sha}: "
            f"the file is corrupt or was replaced; fetch it again with --force"
        )
    n_tensors = 0
    try:
        n_tensors = _check_loads(path, entry)
    except WeightsError as exc:
        problems.append(str(exc))
    return VerifyResult(
        path=path,
        name=name,
        exists=True,
        size=size,
        sha256=digest,
        expected_size=expected_size,
        expected_sha256=expected_sha,
        sha256_reference=reference,
        size_matches=size_ok,
        sha256_matches=sha_ok,
        loads=n_tensors > 0,
        n_tensors=n_tensors,
        problems=tuple(problems),
    )
