"""Tests of the weights registry, cache, download and the ``regpipe-weights`` CLI.

Everything is offline: downloads come from an ``http.server`` thread on 127.0.0.1 or from
``file://`` URLs, and a guard refuses any other outgoing connection.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from regpipe import weights
from regpipe.cli.weights import main
from regpipe.errors import InputError, WeightsError
from regpipe.networks import NetworkConfig, build_network, save_weights

#: A network small enough to save, fetch and load in milliseconds.
TINY = NetworkConfig(grid_shape=(17, 17, 17), n_steps=1, down_channels=(4, 8), up_channels=(4, 8))
N_TINY = len(build_network(TINY).state_dict())

UNIGRADICON_URL = (
    "https://github.com/uncbiag/uniGradICON/releases/download/unigradicon_weights/"
    "Step_2_final.trch"
)


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every outgoing connection that is not to 127.0.0.1 / localhost."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        if address[0] not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


@pytest.fixture(autouse=True)
def tiny_stands_for_the_official_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files fetched or verified as ``unigradicon`` must hold its architecture; the tests
    serve a tiny network (the real one is 283 MB), so it stands in for it here."""
    monkeypatch.setitem(weights.ARCHITECTURES, "unigradicon", lambda: TINY)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty REGPIPE_HOME; downloads allowed."""
    path = tmp_path / "regpipe_home"
    monkeypatch.setenv("REGPIPE_HOME", str(path))
    monkeypatch.delenv("REGPIPE_OFFLINE", raising=False)
    return path


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``small.trch``, a tiny network's weights file (what fetch accepts),
    and ``two.trch``, a two-tensor state dict that fits no network."""
    folder = tmp_path_factory.mktemp("served")
    save_weights(build_network(TINY), folder / "small.trch", {"name": "tiny"})
    state = {"conv.weight": torch.arange(24.0).reshape(2, 3, 4), "conv.bias": torch.zeros(2)}
    torch.save(state, folder / "two.trch")
    (folder / "login.html").write_text("<!DOCTYPE html><html><body>Login required</body></html>")
    return folder


@pytest.fixture
def small_file(served: Path) -> Path:
    return served / "small.trch"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``/truncated`` promises 1000 bytes, sends 100 and hangs up."""

    def do_GET(self) -> None:
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(served: Path) -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 serving ``served``."""
    handler = functools.partial(_Handler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def test_entry(small_file: Path) -> Iterator[weights.WeightsEntry]:
    """A registry entry ``testmodel`` whose URL is the local file, with exact size and sha."""
    entry = weights.register_entry(
        weights.WeightsEntry(
            name="testmodel",
            url=small_file.as_uri(),
            filename="small.trch",
            size=small_file.stat().st_size,
            sha256=weights.sha256sum(small_file),
        )
    )
    yield entry
    weights.unregister_entry("testmodel")


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- registry and cache location -------------------------------------------------------------


def test_registry_has_official_models_with_unknown_checksums() -> None:
    uni = weights.get_entry("unigradicon")
    multi = weights.get_entry("multigradicon")
    assert uni.url == UNIGRADICON_URL
    assert multi.url == UNIGRADICON_URL.replace("unigradicon_weights", "multigradicon_weights")
    for entry in (uni, multi):
        assert entry.sha256 is None
        assert entry.size is None  # only an estimate is known, never checked
        assert entry.approx_size == 282_805_197
        assert entry.filename == "Step_2_final.trch"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(WeightsError, match="unigradicon"):
        weights.get_entry("nosuchmodel")


def test_invalid_entry_is_rejected() -> None:
    with pytest.raises(InputError):
        weights.WeightsEntry(name="Bad.Name", url="http://x", filename="f")
    with pytest.raises(InputError):
        weights.WeightsEntry(name="ok", url="http://x", filename="f", sha256="abc")
    with pytest.raises(InputError):
        weights.WeightsEntry(name="ok", url="http://x", filename="sub/f")


def test_duplicate_registration_is_rejected() -> None:
    with pytest.raises(InputError, match="already registered"):
        weights.register_entry(weights.get_entry("unigradicon"))


def test_cache_dir_uses_regpipe_home(home: Path) -> None:
    assert weights.cache_dir() == home / "weights"
    assert weights.cached_path("unigradicon") == home / "weights/unigradicon/Step_2_final.trch"


def test_cache_dir_falls_back_to_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REGPIPE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg/regpipe/weights"


def test_cache_dir_defaults_to_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGPIPE_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache/regpipe/weights"


def test_default_is_unigradicon_without_bundled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "bundled_dir", lambda: tmp_path)  # an install without it
    assert weights.default_weights_name() == "unigradicon"


def test_default_is_bundled_model_when_its_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_file: Path
) -> None:
    monkeypatch.setattr(weights, "bundled_dir", lambda: tmp_path)
    weights.register_entry(
        weights.WeightsEntry(name="ours", url=None, filename="ours.trch", bundled=True)
    )
    try:
        assert weights.default_weights_name() == "unigradicon"  # file not there yet
        (tmp_path / "ours.trch").write_bytes(small_file.read_bytes())
        assert weights.default_weights_name() == "ours"
        assert weights.resolve_weights("ours") == tmp_path / "ours.trch"
    finally:
        weights.unregister_entry("ours")


def test_sha256sum_matches_hashlib(small_file: Path) -> None:
    assert weights.sha256sum(small_file) == hashlib.sha256(small_file.read_bytes()).hexdigest()


# --- fetch -----------------------------------------------------------------------------------


def test_fetch_over_local_http_server(server: str, small_file: Path, home: Path) -> None:
    path = weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False)
    assert path == home / "weights/unigradicon/Step_2_final.trch"
    assert path.read_bytes() == small_file.read_bytes()
    sidecar = weights.sidecar_path(path)
    assert sidecar.read_text().split() == [weights.sha256sum(small_file), "Step_2_final.trch"]
    assert _files_in(path.parent) == ["Step_2_final.trch", "Step_2_final.trch.sha256"]


def test_fetch_via_file_url(test_entry: weights.WeightsEntry, small_file: Path) -> None:
    path = weights.fetch("testmodel", progress=False)
    assert path.read_bytes() == small_file.read_bytes()


def test_fetch_keeps_cached_file_unless_forced(
    test_entry: weights.WeightsEntry, small_file: Path, tmp_path: Path
) -> None:
    path = weights.fetch("testmodel", progress=False)
    mtime = path.stat().st_mtime_ns
    missing = (tmp_path / "nowhere.trch").as_uri()
    assert weights.fetch("testmodel", url=missing, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(WeightsError, match="cannot read"):
        weights.fetch("testmodel", url=missing, force=True, progress=False)
    assert path.read_bytes() == small_file.read_bytes()  # old file survives a failed refetch


def test_checksum_mismatch_fails_and_leaves_no_file(
    small_file: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = weights.WeightsEntry(
        name="badsum", url=small_file.as_uri(), filename="w.trch", sha256="0" * 64
    )
    weights.register_entry(entry)
    try:
        with pytest.raises(WeightsError, match="checksum mismatch"):
            weights.fetch("badsum", progress=False)
    finally:
        weights.unregister_entry("badsum")
    assert _files_in(home / "weights/badsum") == []


def test_size_mismatch_fails_and_leaves_no_file(small_file: Path, home: Path) -> None:
    weights.register_entry(
        weights.WeightsEntry(name="badsize", url=small_file.as_uri(), filename="w", size=7)
    )
    try:
        with pytest.raises(WeightsError, match="should be 7 bytes"):
            weights.fetch("badsize", progress=False)
    finally:
        weights.unregister_entry("badsize")
    assert _files_in(home / "weights/badsize") == []


def test_http_404_leaves_no_partial_file(server: str, home: Path) -> None:
    with pytest.raises(WeightsError, match="HTTP 404"):
        weights.fetch("unigradicon", url=f"{server}/missing.trch", progress=False)
    assert _files_in(home / "weights/unigradicon") == []


def test_interrupted_download_leaves_no_partial_file(server: str, home: Path) -> None:
    with pytest.raises(WeightsError, match=r"100 of 1000 bytes|connection lost"):
        weights.fetch("unigradicon", url=f"{server}/truncated", progress=False)
    assert _files_in(home / "weights/unigradicon") == []


def test_unreachable_server_says_probably_offline(home: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(WeightsError, match="probably offline") as info:
        weights.fetch("unigradicon", url=f"http://127.0.0.1:{port}/w.trch", progress=False)
    assert str(home / "weights/unigradicon/Step_2_final.trch") in str(info.value)
    assert _files_in(home / "weights/unigradicon") == []


def test_offline_env_blocks_downloads_but_not_local_copies(
    server: str, test_entry: weights.WeightsEntry, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGPIPE_OFFLINE", "1")
    with pytest.raises(WeightsError, match="REGPIPE_OFFLINE"):
        weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False)
    with pytest.raises(WeightsError, match="REGPIPE_OFFLINE"):
        weights.resolve_weights("unigradicon", download=True)
    assert not (home / "weights/unigradicon").exists()
    # a file:// source (a USB stick, a shared folder) is a copy, not a download
    path = weights.fetch("testmodel", progress=False)
    assert weights.verify("testmodel").ok and path.parent == home / "weights/testmodel"


@pytest.mark.parametrize(("served_name", "problem"), [
    ("login.html", "is a web page or text, not a weights file"),
    ("two.trch", "do not fit the network"),
])
def test_fetch_refuses_what_is_not_usable_weights(server: str, home: Path, served_name: str,
                                                 problem: str) -> None:
    with pytest.raises(WeightsError, match=problem) as info:
        weights.fetch("unigradicon", url=f"{server}/{served_name}", progress=False)
    assert "nothing was saved" in str(info.value)
    assert _files_in(home / "weights/unigradicon") == []


def test_fetch_refuses_another_models_weights_under_an_official_name(
        served: Path, home: Path) -> None:
    compact = weights.weights_path("regpipe-compact")  # loads fine, but is not unigradicon
    with pytest.raises(WeightsError, match="not the uniGradICON architecture of 'unigradicon'"):
        weights.fetch("unigradicon", url=str(compact), progress=False)
    assert _files_in(home / "weights/unigradicon") == []
    target = weights.cached_path("unigradicon")  # copied there by hand: verify says so
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(compact.read_bytes())
    assert "another model's weights" in weights.verify("unigradicon").problems[0]


def test_fetch_removes_partial_files_of_killed_downloads(server: str, home: Path) -> None:
    folder = home / "weights/unigradicon"
    folder.mkdir(parents=True)
    old, fresh = folder / ".Step_2_final.trch.k1.part", folder / ".Step_2_final.trch.k2.part"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)  # maybe another fetch's, still running: kept
    hour_ago = old.stat().st_mtime - 3600
    os.utime(old, (hour_ago, hour_ago))
    weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False)
    assert not old.exists() and fresh.exists()


def test_fetch_removes_stale_parts_even_when_the_file_is_cached(
        test_entry: weights.WeightsEntry) -> None:
    path = weights.fetch("testmodel", progress=False)
    part = path.with_name(".small.trch.k1.part")  # a killed fetch's, an hour old
    part.write_bytes(b"x" * 100)
    hour_ago = part.stat().st_mtime - 3600
    os.utime(part, (hour_ago, hour_ago))
    assert weights.fetch("testmodel", progress=False) == path
    assert not part.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_fetch_downloads_a_damaged_cached_file_again(
        server: str, small_file: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    # unigradicon's registry entry has no size or checksum: the sidecar is the reference
    path = weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False)
    data = path.read_bytes()
    broken = data[: len(data) // 2] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:]
    path.write_bytes(broken)  # a copy by hand interrupted, a bit flipped on disk
    assert weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False) == path
    assert path.read_bytes() == small_file.read_bytes()
    assert "is damaged" in caplog.text and "downloading it again" in caplog.text


def test_fetch_keeps_a_cached_file_it_cannot_check(server: str, small_file: Path) -> None:
    path = weights.cached_path("unigradicon")  # put there by hand: no size, sha or sidecar
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placed by hand")
    assert weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False) == path
    assert path.read_bytes() == b"placed by hand"


def test_concurrent_fetches_download_once(test_entry: weights.WeightsEntry,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = weights._download, []
    started = threading.Event()

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(threading.get_ident())
        started.set()
        threading.Event().wait(0.5)  # long enough for the other thread to reach the lock
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "_download", slow)
    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(weights.fetch("testmodel",
                                                                         progress=False)))
    first.start()
    assert started.wait(10)
    results.append(weights.fetch("testmodel", progress=False))  # waits, then finds it cached
    first.join()
    assert len(calls) == 1
    assert results[0] == results[1] == weights.cached_path("testmodel")


def test_full_disk_at_flush_is_a_weights_error_and_leaves_no_part(
        test_entry: weights.WeightsEntry, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights.os, "fsync", no_space)
    with pytest.raises(WeightsError, match=r"No space left on device.*free some space"):
        weights.fetch("testmodel", progress=False)
    assert _files_in(weights.cached_path("testmodel").parent) == []


def test_bundled_entry_fetched_from_a_url_is_used_when_the_packaged_file_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_file: Path) -> None:
    monkeypatch.setattr(weights, "bundled_dir", lambda: tmp_path / "package")  # file missing
    weights.register_entry(
        weights.WeightsEntry(name="ours", url=None, filename="ours.trch", bundled=True)
    )
    try:
        assert weights.weights_path("ours") == tmp_path / "package/ours.trch"
        with pytest.raises(WeightsError, match="bundled"):
            weights.resolve_weights("ours")
        path = weights.fetch("ours", url=small_file.as_uri(), progress=False)
        assert weights.weights_path("ours") == path == weights.cached_path("ours")
        assert weights.resolve_weights("ours") == path
    finally:
        weights.unregister_entry("ours")


def test_fetch_with_url_of_a_cached_file_says_force_is_needed(
        test_entry: weights.WeightsEntry, caplog: pytest.LogCaptureFixture) -> None:
    path = weights.fetch("testmodel", progress=False)
    with pytest.raises(WeightsError, match="not an http"):
        weights.fetch("testmodel", url="ftp://x/y", progress=False)
    assert weights.fetch("testmodel", url=path.as_uri(), progress=False) == path
    assert "--force downloads it again" in caplog.text


def test_bundled_weights_have_nothing_to_fetch() -> None:
    with pytest.raises(WeightsError, match="bundled with regpipe"):
        weights.fetch("regpipe-compact", progress=False)


def test_relative_regpipe_home_is_made_absolute(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REGPIPE_HOME", "relhome")
    assert weights.cache_dir() == tmp_path / "relhome" / "weights"


def test_cli_sigterm_during_fetch_exits_143(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """SLURM's time limit sends SIGTERM: it must unwind (removing partial files), not kill."""
    import signal

    cleaned = []

    def fetch(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)

    monkeypatch.setattr(weights, "fetch", fetch)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["fetch", "unigradicon", "--quiet"]) == 143
    assert cleaned == [True] and "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


# --- resolve_weights -------------------------------------------------------------------------


def test_missing_checkpoint_error_names_url_path_and_command(home: Path) -> None:
    with pytest.raises(WeightsError) as info:
        weights.resolve_weights("unigradicon")
    message = str(info.value)
    assert str(home / "weights/unigradicon/Step_2_final.trch") in message
    assert UNIGRADICON_URL in message
    assert "regpipe-weights fetch unigradicon" in message
    assert "\n" not in message


def test_resolve_downloads_when_asked(test_entry: weights.WeightsEntry, home: Path) -> None:
    path = weights.resolve_weights("testmodel", download=True, progress=False)
    assert path == home / "weights/testmodel/small.trch"
    assert weights.resolve_weights("testmodel") == path  # now cached


def test_resolve_returns_existing_path_as_is(small_file: Path) -> None:
    assert weights.resolve_weights(small_file) == small_file
    assert weights.resolve_weights(str(small_file)) == small_file


def test_resolve_rejects_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        weights.resolve_weights(tmp_path / "absent.trch")


def test_resolve_rejects_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.trch"
    empty.touch()
    with pytest.raises(WeightsError, match="0 bytes"):
        weights.resolve_weights(empty)


def test_resolve_rejects_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "annexed.trch"
    link.symlink_to(tmp_path / ".git/annex/objects/XX/SHA256E-s1--abc.trch")
    with pytest.raises(WeightsError, match="dangling symbolic link"):
        weights.resolve_weights(link)


def test_resolve_rejects_git_lfs_pointer(tmp_path: Path) -> None:
    pointer = tmp_path / "lfs.trch"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(WeightsError, match="Git LFS pointer"):
        weights.resolve_weights(pointer)


def test_resolve_rejects_empty_cached_file(home: Path) -> None:
    target = weights.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.touch()
    with pytest.raises(WeightsError, match="0 bytes"):
        weights.resolve_weights("unigradicon")


def test_resolve_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="unknown weights name"):
        weights.resolve_weights("nosuchmodel")


# --- verify and load -------------------------------------------------------------------------


def test_verify_fetched_file(test_entry: weights.WeightsEntry) -> None:
    weights.fetch("testmodel", progress=False)
    result = weights.verify("testmodel")
    assert result.ok, result.problems
    assert result.loads and result.n_tensors == N_TINY
    assert result.sha256_matches is True and result.sha256_reference == "registry"
    assert result.size_matches is True


def test_verify_detects_corruption_via_sidecar(server: str) -> None:
    path = weights.fetch("unigradicon", url=f"{server}/small.trch", progress=False)
    assert weights.verify("unigradicon").sha256_reference == "sidecar"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = weights.verify("unigradicon")
    assert not result.ok
    assert result.sha256_matches is False
    assert any("corrupt" in problem for problem in result.problems)


def test_verify_missing_file() -> None:
    result = weights.verify("unigradicon")
    assert not result.exists and not result.ok


def test_verify_path_without_reference_checksum(small_file: Path) -> None:
    result = weights.verify(small_file)
    assert result.ok and result.sha256_matches is None and result.n_tensors == N_TINY


@pytest.mark.parametrize(
    ("content", "problem"),
    [({"a": torch.zeros(1), "b": 3}, "not tensors"), ([torch.zeros(1)], "not a state dict")],
)
def test_verify_rejects_non_state_dict(tmp_path: Path, content: object, problem: str) -> None:
    path = tmp_path / "odd.trch"
    torch.save(content, path)
    result = weights.verify(path)
    assert not result.ok and not result.loads
    assert problem in result.problems[0]


def test_verify_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "pickled.trch"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)
    result = weights.verify(path)
    assert not result.loads
    assert "holds Python objects besides tensors, which regpipe never loads" in result.problems[0]
    assert "weights_only` set to `False`" not in result.problems[0]  # never torch's advice


def test_verify_loads_the_file_into_its_network(tmp_path: Path, served: Path) -> None:
    result = weights.verify(served / "small.trch")
    assert result.ok, result.problems
    assert result.n_tensors == N_TINY
    wrong = weights.verify(served / "two.trch")  # tensors, but of no network
    assert not wrong.ok and not wrong.loads
    assert "two.trch do not fit the network" in wrong.problems[0]
    assert "unexpected keys (2): conv.weight, conv.bias" in wrong.problems[0]


def test_verify_names_truncated_files(tmp_path: Path, served: Path) -> None:
    truncated = tmp_path / "truncated.trch"
    truncated.write_bytes((served / "small.trch").read_bytes()[:3000])
    result = weights.verify(truncated)
    assert "is a damaged or truncated weights file" in result.problems[0]


# --- command line ----------------------------------------------------------------------------


def test_cli_list(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"{weights.default_weights_name()} *" in out
    assert "unigradicon" in out and "multigradicon" in out and "regpipe-compact" in out
    assert UNIGRADICON_URL in out
    assert str(home / "weights/unigradicon/Step_2_final.trch") in out
    assert "~282.8 MB" in out


def test_cli_list_marks_cached(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    weights.fetch("multigradicon", url=f"{server}/small.trch", progress=False)
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "multigradicon" in ln)
    assert line.split()[1] == "yes"


def test_cli_path(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    assert main(["path", "unigradicon"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(home / "weights/unigradicon/Step_2_final.trch")
    assert "regpipe-weights fetch unigradicon" in captured.err
    assert main(["path", "default"]) == 0  # the bundled default, as --weights default means
    assert capsys.readouterr().out.strip().endswith("regpipe-compact.pt")


def test_cli_fetch_and_verify(
    test_entry: weights.WeightsEntry, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    assert main(["fetch", "testmodel", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "weights/testmodel/small.trch")
    assert main(["verify", "testmodel"]) == 0
    out = capsys.readouterr().out
    assert "result:  OK" in out and f"{N_TINY} tensors, into the network" in out


def test_cli_verify_missing_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "unigradicon"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("regpipe-weights: error:")


def test_cli_verify_corrupt_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.trch"
    path.write_bytes(os.urandom(2048))
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert "result:  FAILED" in captured.out
    assert "Traceback" not in captured.err


def test_cli_errors_are_one_line_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "nosuchmodel"]) == 1
    assert main(["path", "nosuchmodel"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_cli_offline_fetch_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGPIPE_OFFLINE", "1")
    assert main(["fetch", "unigradicon"]) == 1
    assert "REGPIPE_OFFLINE" in capsys.readouterr().err


def test_cli_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["fetch"]) == 2


def test_cli_verify_missing_name_says_how_to_fetch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "multigradicon"]) == 1
    assert "regpipe-weights fetch multigradicon" in capsys.readouterr().err


def test_verify_reports_dangling_symlink_in_cache(tmp_path: Path) -> None:
    target = weights.cached_path("unigradicon")
    target.parent.mkdir(parents=True)
    target.symlink_to(tmp_path / "annex/object")
    result = weights.verify("unigradicon")
    assert not result.exists and "dangling symbolic link" in result.problems[0]


def test_average_weights_is_the_mean_of_the_files(tmp_path: Path, capsys) -> None:
    from regpipe.cli.weights import main
    from regpipe.networks import NetworkConfig, build_network, network_from_file, save_weights

    config = NetworkConfig((17, 17, 17), 1, (4, 4), (4, 4))
    files = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        network = build_network(config)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.normal_(0.0, 0.1)
        files.append(save_weights(network, tmp_path / f"s{seed}.pt", {"name": f"s{seed}"}))
    assert main(["average", str(tmp_path / "mean.pt"), *map(str, files)]) == 0
    mean = network_from_file(tmp_path / "mean.pt")
    parts = [network_from_file(f).regis_net.state_dict() for f in files]
    for key, value in mean.regis_net.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(p[key] for p in parts) / 3, atol=1e-6), key
    card = mean.metadata
    assert [entry["file"] for entry in card["averaged_from"]] == ["s0.pt", "s1.pt", "s2.pt"]
    # a tensor equal in every file (a frozen base) stays bit-exact
    twice = save_weights(network_from_file(files[0]), tmp_path / "again.pt")
    assert main(["average", str(tmp_path / "same.pt"), str(files[0]), str(twice)]) == 0
    same = network_from_file(tmp_path / "same.pt").regis_net.state_dict()
    original = network_from_file(files[0]).regis_net.state_dict()
    assert all(torch.equal(same[k], original[k]) for k in original)
    assert card["name"] == "s2"
    other = save_weights(build_network(NetworkConfig((17, 17, 17), 1, (4, 8), (4, 8))),
                         tmp_path / "other.pt")
    assert main(["average", str(tmp_path / "bad.pt"), str(files[0]), str(other)]) == 1
    assert "different network configurations" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["regpipe-compact", "regpipe-conditional"])
def test_bundled_files_match_their_registry_checksums(name: str) -> None:
    """The registry records the bundled files' size and SHA-256 (so verify detects a damaged
    installation): replacing a bundled file means updating them."""
    result = weights.verify(name)
    assert result.ok, result.problems
    assert result.sha256_reference == "registry" and result.sha256_matches is True
