"""Atomic file writes: a file appears whole at its path, or not at all.

Every writer in regpipe (images, transforms, tables, JSON, checkpoints, reports) goes through
:func:`atomic_write`: the content is written to a temporary file in the destination folder and
moved onto the destination with one ``os.replace``, so a crash, a full disk or a killed job
never leaves a truncated output for a later run to trust, and a reader never sees a half-written
file. Temporary files are named ``.<name>.<random><suffix>`` (hidden, and keeping the
destination's suffix, from which writers such as nibabel choose the format) and are removed on
failure. Files get the usual permissions ``0666 & ~umask`` (``tempfile`` makes them 0600).

Example
-------
>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> atomic_write_text(folder / "a" / "notes.txt", "hello\\n", parents=True).read_text()
'hello\\n'
>>> def broken(tmp):
...     tmp.write_text("half")
...     raise RuntimeError("disk full")
>>> try:
...     atomic_write(folder / "b.txt", broken)
... except RuntimeError:
...     pass
>>> sorted(p.name for p in folder.iterdir())
['a']
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from regpipe.errors import InputError

__all__ = ["atomic_copy", "atomic_write", "atomic_write_text", "check_distinct_paths",
           "check_output_folder", "json_ready"]


def check_output_folder(path: str | os.PathLike[str], what: str | None = None) -> None:
    """Refuse an output ``path`` whose folder is missing or not writable, or that is a folder,
    before any work (``what`` names it in the message, e.g. ``--warped_moving_out``)."""
    path = Path(path)
    name = f"{what} {path}" if what else f"cannot write {path}"
    if path.is_dir():
        raise InputError(f"{name} is a folder; give a file name")
    folder = path.parent
    if not folder.resolve().is_dir():
        raise InputError(f"{name}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{name}: folder {folder} is not writable")


def json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` and paths as strings, recursively: JSON
    that strict readers (jq, JavaScript, most non-Python parsers) accept, where Python would
    write the non-standard ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links and ``..`` are resolved,
    or (both existing) the same inode, as hard links or a bind mount give."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_distinct_paths(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """Refuse, before any work, an output path that is one of the ``inputs`` (writing it would
    destroy that input) or another output (one would silently replace the other).

    Both mappings go from a name used in the message (``--warped_moving_out``, ``moving``) to
    a path or ``None`` (absent).

    Raises
    ------
    InputError
        Naming both and the file.
    """
    given_inputs = [(name, Path(path)) for name, path in (inputs or {}).items()
                    if isinstance(path, (str, os.PathLike))]
    seen: list[tuple[str, Path]] = []
    for name, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        for other, input_path in given_inputs:
            if _same_file(path, input_path):
                raise InputError(f"{name} {path} is the {other} input: writing it would destroy "
                                 "that input; choose another output name")
        for other, earlier in seen:
            if _same_file(path, earlier):
                raise InputError(f"{other} and {name} are the same file {path}: one would "
                                 "replace the other; give them different names")
        seen.append((name, path))


def _suffix(path: Path) -> str:
    """The suffix writers read the format from, lower-cased (nibabel and ITK choose the format
    by a case-sensitive suffix): ``.nii.gz`` for gzipped files, else the last."""
    gzipped = path.name.lower().endswith(".gz")
    return ("".join(path.suffixes[-2:]) if gzipped else path.suffix).lower()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], Any], *, parents: bool = False,
    suffix: str | None = None,
) -> Path:
    """Call ``write(tmp_path)``, then move the temporary file onto ``path`` in one step.

    Parameters
    ----------
    path
        Destination.
    write
        Writes the content to the path it is given (a file in ``path``'s folder that already
        exists, empty, with ``path``'s suffix).
    parents
        Create missing parent folders; otherwise a missing folder is an :class:`InputError`.
    suffix
        The temporary file's suffix, when the writer needs another spelling than ``path``'s
        (default: ``path``'s, ``.nii.gz`` for gzipped files).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        When the folder does not exist and ``parents`` is false. Anything ``write`` raises
        propagates, after the temporary file is removed.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.",
                                suffix=_suffix(path) if suffix is None else suffix,
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, parents: bool = False
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`); a ``path``
    that already holds exactly this text is left alone (its modification time too)."""
    data = text.encode("utf-8")
    target = Path(path)
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return target
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), parents=parents)


def atomic_copy(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *, parents: bool = False
) -> Path:
    """Copy ``source``'s bytes to ``path`` atomically; a byte-identical ``path`` is left alone
    (its modification time too)."""
    source, path = Path(source), Path(path)
    same_size = path.is_file() and path.stat().st_size == source.stat().st_size
    if same_size and path.read_bytes() == source.read_bytes():
        return path
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp), parents=parents)
