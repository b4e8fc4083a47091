"""The examples in the docstrings run and print what they say (``doctest``).

Examples marked ``# doctest: +SKIP`` need data or time the suite does not have; every other
example is checked here, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest


def _modules() -> list[str]:
    """Every module of the namespace; ``regpipe.workflows`` and ``regpipe.bids_app`` live in
    their own folders (``package_dir``), so each package is walked from its own path."""
    names = set()
    for package in ("regpipe", "regpipe.workflows", "regpipe.bids_app"):
        module = importlib.import_module(package)
        names.add(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                names.add(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_walk_reaches_the_library_workflows_and_app():
    expected = {"regpipe.training", "regpipe.workflows.jobs", "regpipe.bids_app.parser"}
    assert expected <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
