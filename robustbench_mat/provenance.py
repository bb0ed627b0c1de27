"""Which code made a run: the package version and a fingerprint of the source that computes it.

A stored result is reused only by a run with the same fingerprint, so that editing a method's
`loss`, a dataset's generator or the shared loop never returns numbers made by the old code.
The fingerprint hashes every source file of `robustbench_mat` (the core, the built-in methods and
datasets) and, for plugins from other packages, the files that define the method's and the
dataset's classes (their whole class hierarchy) and their distribution's version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

PACKAGE = "robustbench_mat"


def package_version() -> str:
    try:
        return version("robustbench-mat")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class CodeVersion:
    """The version of the harness and a hash of the source that determined a run's numbers;
    `plugins` names the outside distributions (with versions) whose code took part."""

    package_version: str
    fingerprint: str
    plugins: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = f", plugins {', '.join(self.plugins)}" if self.plugins else ""
        return f"robustbench-mat {self.package_version} (code {self.fingerprint}{extra})"


def code_version(*classes: type) -> CodeVersion:
    """The code version of a run using `classes` (its method and dataset classes)."""
    digest = hashlib.sha256(_package_digest().encode())
    plugins: set[str] = set()
    for path in sorted({p for cls in classes for p in _outside_sources(cls)}):
        digest.update(path.encode())
        digest.update(_file_digest(path).encode())
    for cls in classes:
        plugins.update(_distributions(cls))
    return CodeVersion(package_version(), digest.hexdigest()[:12], tuple(sorted(plugins)))


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    """One hash of every Python file of the installed package (stable within a process)."""
    root = Path(sys.modules[PACKAGE].__file__).parent
    digest = hashlib.sha256()
    # `methods`, `datasets` and `leaderboard` are subpackages that an editable install maps to
    # folders beside `robustbench_mat/`: hash them through the package's own module paths.
    folders = {root}
    for sub in ("methods", "datasets", "leaderboard"):
        module = importlib.import_module(f"{PACKAGE}.{sub}")
        folders.update(Path(p) for p in getattr(module, "__path__", []))
    for folder in sorted(folders):
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _outside_sources(cls: type) -> list[str]:
    """The source files of `cls` and its bases outside this package and torch: the plugin's
    own code."""
    files = []
    for base in inspect.getmro(cls):
        module = sys.modules.get(base.__module__)
        if module is None or base.__module__.split(".")[0] in _NOT_PLUGIN_CODE:
            continue
        path = getattr(module, "__file__", None)
        if path:
            files.append(str(Path(path).resolve()))
    return files


_NOT_PLUGIN_CODE = {PACKAGE, "builtins", "torch", "abc", "typing"}


def _file_digest(path: str) -> str:
    # Not cached: a plugin file edited between two runs of one process must count.
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(cls: type) -> list[str]:
    """`name version` of the installed distributions that provide `cls`'s own module."""
    top = cls.__module__.split(".")[0]
    if top in _NOT_PLUGIN_CODE:
        return []
    names = _packages_distributions().get(top, [])
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return found
