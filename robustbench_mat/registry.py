"""The plugin registry: every method and every dataset is a class registered under a name.

Built-in plugins live in the `robustbench_mat.methods` and `robustbench_mat.datasets` packages and
register themselves with the decorators below. Other installed packages add plugins through the
entry-point groups `robustbench_mat.methods` and `robustbench_mat.datasets`; an entry point may name
a module (whose import runs the decorators) or a class (registered under the entry point's name).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from robustbench_mat.errors import UserError

T = TypeVar("T", bound=type)

BUILT_IN = "built-in"


@dataclass(frozen=True)
class PluginInfo:
    """What `robustbench-mat list` shows of one plugin."""

    name: str
    cls: type
    description: str
    source: str


class UnknownPluginError(UserError):
    """A method or dataset name that no plugin registered."""


def normalize_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _first_docstring_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


class Registry:
    """Name -> plugin class for one kind of plugin, filled lazily on first lookup."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str) -> None:
        self.kind = kind
        self.builtin_package = builtin_package
        self.entry_point_group = entry_point_group
        self._plugins: dict[str, PluginInfo] = {}
        self._discovered = False
        self._loading_source: str | None = None

    def register(self, name: str, *, description: str | None = None) -> Callable[[T], T]:
        """Class decorator registering a plugin under `name` (case-insensitive, '_' == '-')."""

        def decorator(cls: T) -> T:
            self._add(name, cls, description)
            return cls

        return decorator

    def _add(self, name: str, cls: type, description: str | None) -> None:
        key = normalize_name(name)
        existing = self._plugins.get(key)
        if existing is not None and existing.cls is not cls:
            if (existing.cls.__module__, existing.cls.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            ):
                pass  # the same module imported twice (e.g. by path and by package)
            else:
                raise ValueError(
                    f"{self.kind} name {key!r} is already registered by {existing.source} "
                    f"({existing.cls.__module__}.{existing.cls.__qualname__}); pick another name"
                )
        source = self._loading_source or self._source_of(cls)
        cls.name = key  # type: ignore[attr-defined]
        self._plugins[key] = PluginInfo(key, cls, description or _first_docstring_line(cls), source)

    def _source_of(self, cls: type) -> str:
        if cls.__module__.startswith("robustbench_mat."):
            return BUILT_IN
        return cls.__module__

    def discover(self) -> None:
        """Import the built-in plugins and the entry points of installed packages, once."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.builtin_package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.builtin_package}.{module.name}")
        for entry_point in entry_points(group=self.entry_point_group):
            self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: Any) -> None:
        dist = getattr(entry_point, "dist", None)
        source = (
            f"package {dist.name} {dist.version}" if dist else f"entry point {entry_point.value}"
        )
        self._loading_source = source
        try:
            loaded = entry_point.load()
            if isinstance(loaded, type) and loaded not in {p.cls for p in self._plugins.values()}:
                self._add(entry_point.name, loaded, None)
        except Exception as error:  # a broken third-party plugin must not break the harness
            warnings.warn(
                f"could not load {self.kind} plugin {entry_point.name!r} from {source}: {error}",
                stacklevel=2,
            )
        finally:
            self._loading_source = None

    def info(self, name: str) -> PluginInfo:
        self.discover()
        key = normalize_name(name)
        if key not in self._plugins:
            known = sorted(self._plugins)
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; {hint}known: {', '.join(known)} "
                f"(`robustbench-mat list` describes them)"
            )
        return self._plugins[key]

    def get(self, name: str) -> Any:
        return self.info(name).cls

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[PluginInfo]:
        self.discover()
        return iter(sorted(self._plugins.values(), key=lambda p: p.name))

    def __contains__(self, name: str) -> bool:
        self.discover()
        return normalize_name(name) in self._plugins


METHODS = Registry("method", "robustbench_mat.methods", "robustbench_mat.methods")
DATASETS = Registry("dataset", "robustbench_mat.datasets", "robustbench_mat.datasets")


def register_method(name: str, *, description: str | None = None) -> Callable[[T], T]:
    """Register a `Method` subclass under `name` (see `robustbench_mat.method.Method`)."""
    return METHODS.register(name, description=description)


def register_dataset(name: str, *, description: str | None = None) -> Callable[[T], T]:
    """Register a `BenchmarkDataset` subclass under `name` (see `robustbench_mat.data`)."""
    return DATASETS.register(name, description=description)
