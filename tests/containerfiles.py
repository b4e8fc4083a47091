"""Readers for the container recipes, for the tests: the Dockerfile and the Apptainer definition.

Just enough of each syntax for what the repository's recipes use (no multi-stage builds, no
heredocs): continuation lines are joined, comments dropped, and each instruction or section is
returned as plain Python values.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEFINITION = ROOT / "containers" / "regpipe.def"
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comment lines dropped (also inside a
    continued instruction, as Docker does); runs of blanks collapse to one space."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        lines.append(" ".join((current + stripped).split()))
        current = ""
    if current.strip():
        lines.append(" ".join(current.split()))
    return lines


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``${NAME}`` and ``$NAME`` by ``values[NAME]`` where known."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile, in order, as ``(KEYWORD, arguments)``."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        pairs = []
        for line in _logical_lines(path.read_text()):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
        return cls(pairs)

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    @property
    def base_image(self) -> str:
        (base,) = self.all("FROM")
        return substitute(base, self.args)

    @property
    def args(self) -> dict[str, str]:
        """``ARG`` names and their defaults (``""`` when none)."""
        found = {}
        for rest in self.all("ARG"):
            name, _, default = rest.partition("=")
            found[name] = shlex.split(default)[0] if default else ""
        return found

    @property
    def env(self) -> dict[str, str]:
        """Every ``ENV`` variable and its value as written (``${VERSION}`` not substituted)."""
        return dict(pair for rest in self.all("ENV") for pair in _key_values(rest))

    @property
    def labels(self) -> dict[str, str]:
        return dict(pair for rest in self.all("LABEL") for pair in _key_values(rest))

    def copies(self) -> list[tuple[str, str]]:
        """``(source, absolute destination)`` of every ``COPY``, one pair per source."""
        pairs, workdir = [], "/"
        for key, rest in self.instructions:
            if key == "WORKDIR":
                workdir = str(Path(workdir, rest))
            elif key == "COPY":
                *sources, destination = [w for w in shlex.split(rest) if not w.startswith("--")]
                target = Path(workdir, destination)
                for source in sources:
                    to = target / Path(source).name if destination.endswith("/") else target
                    pairs.append((source, str(to)))
        return pairs

    def runs(self) -> list[tuple[str, str]]:
        """``(working folder, command)`` of every ``RUN``."""
        found, workdir = [], "/"
        for key, rest in self.instructions:
            if key == "WORKDIR":
                workdir = str(Path(workdir, rest))
            elif key == "RUN":
                found.append((workdir, rest))
        return found

    @property
    def entrypoint(self) -> list[str]:
        (entrypoint,) = self.all("ENTRYPOINT")
        return json.loads(entrypoint)

    @property
    def user(self) -> str:
        return self.all("USER")[-1]

    def build_script(self) -> list[str]:
        """The shell commands of an equivalent Apptainer ``%post``: build arguments first (as
        template variables), then, in order, each ``ENV`` as ``export``, each working-folder
        change as ``cd`` and each ``RUN`` command; ``ENV`` after the last ``RUN`` is left out."""
        commands = [f'{name}="{{{{ {name} }}}}"' for name in self.args]
        body: list[str] = []
        workdir, current = "/", "/"
        for key, rest in self.instructions:
            if key == "ENV":
                body += [f"export {k}={v}" for k, v in _key_values(rest)]
            elif key == "WORKDIR":
                workdir = str(Path(workdir, rest))
            elif key == "RUN":
                if workdir != current:
                    body.append(f"cd {workdir}")
                    current = workdir
                body.append(rest)
                commands += body
                body = []
        return commands

    def image_environment(self, root: Path | None = None) -> dict[str, str]:
        """The image's run-time environment: ``ENV`` with ``ARG`` defaults substituted; with
        ``root``, absolute paths are moved under it (``/opt/x`` -> ``root/opt/x``)."""
        env = {key: substitute(value, self.args) for key, value in self.env.items()}
        if root is not None:
            env = {k: str(root / v.lstrip("/")) if v.startswith("/") else v
                   for k, v in env.items()}
        return env


def _key_values(text: str) -> list[tuple[str, str]]:
    pairs = []
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"only KEY=VALUE forms are read, not {text!r}")
        pairs.append((key, value))
    return pairs


@dataclass
class Definition:
    """An Apptainer definition file: header keywords and sections' logical lines."""

    header: dict[str, str]
    sections: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path = DEFINITION) -> Definition:
        header: dict[str, str] = {}
        chunks: dict[str, list[str]] = {}
        name = None
        for raw in path.read_text().splitlines():
            if raw.startswith("%"):
                name = raw[1:].split()[0]
                chunks.setdefault(name, [])
            elif name is None:
                key, sep, value = raw.partition(":")
                if sep and not raw.lstrip().startswith("#"):
                    header[key.strip()] = value.strip()
            else:
                chunks[name].append(raw)
        return cls(header, {k: _logical_lines("\n".join(v)) for k, v in chunks.items()})

    def pairs(self, section: str, separator: str | None = None) -> dict[str, str]:
        """``KEY=VALUE`` (``separator="="``) or ``key value`` lines of a section as a dict."""
        found = {}
        for line in self.sections.get(section, []):
            if separator == "=":
                key, _, value = line.removeprefix("export ").partition("=")
            else:
                key, _, value = line.partition(" ")
            found[key] = value
        return found
