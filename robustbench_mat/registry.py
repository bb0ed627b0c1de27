"""The plugin registry: every method and every dataset is a class registered under a name.

Built-in plugins live in the `robustbench_mat.methods` and `robustbench_mat.datasets` packages and
register themselves with the decorators below. Other installed packages add plugins through the
entry-point groups `robustbench_mat.methods` and `robustbench_mat.datasets`; an entry point may name
a module (whose import runs the decorators) or a class (registered under the entry point's name).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
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


# --- what `robustbench-mat list` shows, kept between calls ---------------------------------------
LISTING_FORMAT = 1
Listing = dict[str, list[tuple[str, str, str]]]


def plugin_listing() -> Listing:
    """`{"methods": rows, "datasets": rows}`, each row (name, description, source): what
    `robustbench-mat list` prints.

    Finding the plugins imports every one of them, and with them torch (about 2 s). The rows are
    therefore kept in the user's cache folder (`plugins.json` in `cache_folder()`) under a
    fingerprint of everything that could change them: this package's version and registry, the
    built-in plugin files, and every installed plugin's entry point, package version and files
    (paths, sizes and modification times). A later call with the same fingerprint reads the
    rows instead of importing. A plugin that fails to load is never cached over: its warning
    shows at every call."""
    fingerprint = _listing_fingerprint()
    path = _listing_cache()
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return {kind: [tuple(row) for row in rows] for kind, rows in stored["rows"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # no cache yet, or an unreadable one: list afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows: Listing = {
            kind: [(p.name, p.description, p.source) for p in registry]
            for kind, registry in (("methods", METHODS), ("datasets", DATASETS))
        }
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not caught:
        _store(path, {"fingerprint": fingerprint, "rows": rows})
    return rows


def cache_folder() -> Path:
    """The user's cache folder for what the package can rebuild at any time (the plugin
    listing, an empty MLflow store): `$ROBUSTBENCH_MAT_CACHE_DIR`, by default
    `$XDG_CACHE_HOME/robustbench-mat/`, else `~/.cache/robustbench-mat/`."""
    folder = os.environ.get("ROBUSTBENCH_MAT_CACHE_DIR")
    if folder:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robustbench-mat"


def _listing_cache() -> Path:
    return cache_folder() / "plugins.json"


def _store(path: Path, content: dict[str, Any]) -> None:
    """Write `content` as JSON atomically; a cache that cannot be written is simply not kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(content))
        os.replace(temporary, path)
    except OSError:
        pass


def _listing_fingerprint() -> str:
    """A hash of what the listing depends on, computed without importing any plugin."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("robustbench-mat")
    except PackageNotFoundError:
        own = "unknown"
    parts: list[Any] = [LISTING_FORMAT, own, _file_stamps([Path(__file__)])]
    for registry in (METHODS, DATASETS):
        spec = importlib.util.find_spec(registry.builtin_package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        parts.append(_file_stamps(p for folder in folders for p in Path(folder).glob("*.py")))
        for entry_point in sorted(entry_points(group=registry.entry_point_group)):
            dist = getattr(entry_point, "dist", None)
            parts.append(
                [
                    registry.entry_point_group,
                    entry_point.name,
                    entry_point.value,
                    dist.name if dist else None,
                    dist.version if dist else None,
                    _module_stamps(entry_point.value.split(":")[0].split(".")[0]),
                ]
            )
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _module_stamps(name: str) -> list[Any]:
    """Stamps of the files of top-level module or package `name` (found, not imported)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return [name, "not found"]
    if spec is None:
        return [name, "not found"]
    if spec.submodule_search_locations:
        return _file_stamps(
            Path(root) / file
            for folder in spec.submodule_search_locations
            for root, _, files in os.walk(folder)
            for file in files
            if file.endswith(".py")
        )
    return _file_stamps([Path(spec.origin)] if spec.origin else [])


def _file_stamps(paths: Any) -> list[tuple[str, int, int]]:
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return sorted(stamps)
