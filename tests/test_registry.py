"""The plugin registry: built-ins, name lookup and errors, entry points of installed packages."""

from __future__ import annotations

import types
import warnings
from types import SimpleNamespace

import pytest

import robustbench_mat.registry as registry_module
from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.datasets.synthetic import Synthetic
from robustbench_mat.errors import UserError
from robustbench_mat.method import Method
from robustbench_mat.methods.erm import ERM
from robustbench_mat.registry import (
    BUILT_IN,
    DATASETS,
    METHODS,
    Registry,
    UnknownPluginError,
    normalize_name,
)

GROUP = "robustbench_mat_tests.methods"


class FakeEntryPoint:
    """What `importlib.metadata.entry_points` yields, reduced to what the registry reads."""

    def __init__(self, name, loader, dist=("robustbench-extra", "1.2.3"), value="extra:Plugin"):
        self.name = name
        self.value = value
        self._loader = loader
        self.dist = None if dist is None else SimpleNamespace(name=dist[0], version=dist[1])

    def load(self):
        return self._loader()


def _registry(monkeypatch, *entry_points_):
    """A registry of our own whose entry-point group yields `entry_points_`."""
    seen_groups = []

    def fake_entry_points(*, group):
        seen_groups.append(group)
        return list(entry_points_) if group == GROUP else []

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = Registry("method", "robustbench_mat.methods", GROUP)
    return registry, seen_groups


# --- built-ins ---------------------------------------------------------------------------------


def test_builtin_method_erm_is_discovered_with_description_and_source():
    info = METHODS.info("erm")
    assert info.cls is ERM
    assert info.name == "erm"
    assert ERM.name == "erm"
    assert info.source == BUILT_IN == "built-in"
    assert info.description == (
        "Empirical risk minimisation: the mean cross-entropy of one network (the reference row)."
    )
    assert "erm" in METHODS.names()
    assert "erm" in {p.name for p in METHODS}


def test_builtin_dataset_synthetic_is_discovered_with_description_and_source():
    info = DATASETS.info("synthetic")
    assert info.cls is Synthetic
    assert issubclass(info.cls, BenchmarkDataset)
    assert info.source == "built-in"
    assert info.description.startswith("Figure 1 of the MAT paper")
    assert "\n" not in info.description
    assert "synthetic" in DATASETS.names()


def test_methods_and_datasets_are_separate_namespaces():
    assert "synthetic" not in METHODS
    assert "erm" not in DATASETS


# --- lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["erm", "ERM", " Erm ", "eRm"])
def test_method_names_are_case_and_space_insensitive(name):
    assert METHODS.get(name) is ERM
    assert name in METHODS


def test_underscores_and_hyphens_are_the_same_name(monkeypatch):
    registry, _ = _registry(monkeypatch)

    @registry.register("group-dro")
    class GroupDRO(Method):
        """Group DRO."""

    for spelling in ("group-dro", "group_dro", "GROUP_DRO", "Group-Dro"):
        assert registry.get(spelling) is GroupDRO
    assert GroupDRO.name == "group-dro"
    assert registry.names() == ["group-dro"]
    assert normalize_name(" Some_Name ") == "some-name"


def test_unknown_name_lists_close_matches_known_names_and_the_list_command():
    with pytest.raises(UnknownPluginError) as caught:
        METHODS.get("emr")
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert "unknown method 'emr'" in message
    assert "did you mean erm?" in message
    assert "known: " in message and "erm" in message.split("known: ", 1)[1]
    assert "robustbench-mat list" in message
    assert "\n" not in message


def test_unknown_dataset_without_close_match_still_lists_known_names():
    with pytest.raises(UnknownPluginError) as caught:
        DATASETS.get("imagenet-zzz")
    message = str(caught.value)
    assert "unknown dataset 'imagenet-zzz'" in message
    assert "did you mean" not in message
    assert "synthetic" in message.split("known: ", 1)[1]
    assert "robustbench-mat list" in message


def test_close_matches_offer_several_names(monkeypatch):
    registry, _ = _registry(monkeypatch)
    for name in ("group-dro", "group-drop", "jtt"):
        registry.register(name)(type(name.title().replace("-", ""), (Method,), {}))
    message = str(pytest.raises(UnknownPluginError, registry.get, "groupdro").value)
    hint = message.split("did you mean ", 1)[1].split("?", 1)[0]
    assert set(hint.split(", ")) == {"group-dro", "group-drop"}
    assert "jtt" in message.split("known: ", 1)[1]


# --- registration ------------------------------------------------------------------------------


def test_duplicate_name_with_a_different_class_raises(monkeypatch):
    registry, _ = _registry(monkeypatch)

    @registry.register("mine")
    class First(Method):
        """First."""

    class Second(Method):
        """Second."""

    with pytest.raises(ValueError, match="'mine' is already registered"):
        registry.register("MINE")(Second)
    assert registry.get("mine") is First


def test_registering_the_same_class_twice_is_harmless(monkeypatch):
    registry, _ = _registry(monkeypatch)

    class Plugin(Method):
        """Plugin."""

    registry.register("plugin")(Plugin)
    registry.register("plugin")(Plugin)
    assert registry.get("plugin") is Plugin


def test_same_module_imported_twice_is_not_a_duplicate(monkeypatch):
    """A module imported by path and by package defines two class objects with the same name."""
    registry, _ = _registry(monkeypatch)
    first = type("Twin", (Method,), {"__module__": "somepkg.twin", "__doc__": "Twin."})
    second = type("Twin", (Method,), {"__module__": "somepkg.twin", "__doc__": "Twin."})
    registry.register("twin")(first)
    registry.register("twin")(second)
    assert registry.get("twin") is second


def test_description_argument_overrides_the_docstring(monkeypatch):
    registry, _ = _registry(monkeypatch)

    @registry.register("described", description="Given explicitly")
    class Described(Method):
        """From the docstring."""

    info = registry.info("described")
    assert info.description == "Given explicitly"
    # Defined in this test module, not in robustbench_mat: not a built-in.
    assert info.source == __name__


def test_description_is_the_first_docstring_line(monkeypatch):
    registry, _ = _registry(monkeypatch)

    @registry.register("documented")
    class Documented(Method):
        """First line.

        More text.
        """

    @registry.register("undocumented")
    class Undocumented(Method):
        pass

    Undocumented.__doc__ = None
    assert registry.info("documented").description == "First line."
    assert registry.info("undocumented").description == ""


# --- entry points ------------------------------------------------------------------------------


def test_entry_point_class_is_registered_with_its_package_as_source(monkeypatch):
    class Fancy(Method):
        """A fancy third-party method."""

    registry, groups = _registry(monkeypatch, FakeEntryPoint("Fancy_Method", lambda: Fancy))
    info = registry.info("fancy-method")
    assert GROUP in groups
    assert info.cls is Fancy
    assert info.name == "fancy-method"
    assert Fancy.name == "fancy-method"
    assert info.source == "package robustbench-extra 1.2.3"
    assert info.description == "A fancy third-party method."
    # The registry's discovery happens once.
    registry.names()
    assert groups.count(GROUP) == 1


def test_entry_point_naming_a_module_registers_through_the_decorators(monkeypatch):
    """An entry point may name a module whose import runs `register` itself."""
    holder = {}

    class FromModule(Method):
        """Registered while its module loads."""

    def load_module():
        holder["registry"].register("from-module")(FromModule)
        return types.ModuleType("extra_plugins")

    registry, _ = _registry(
        monkeypatch, FakeEntryPoint("extra", load_module, dist=("extra-plugins", "0.4"))
    )
    holder["registry"] = registry
    info = registry.info("from-module")
    assert info.cls is FromModule
    assert info.source == "package extra-plugins 0.4"
    assert "extra" not in registry  # the module itself is not a plugin


def test_entry_point_without_distribution_names_its_value(monkeypatch):
    class Loose(Method):
        """Loose."""

    registry, _ = _registry(
        monkeypatch, FakeEntryPoint("loose", lambda: Loose, dist=None, value="loose_mod:Loose")
    )
    assert registry.info("loose").source == "entry point loose_mod:Loose"


def test_entry_point_of_an_already_registered_class_is_not_added_twice(monkeypatch):
    holder = {}

    class Both(Method):
        """Both."""

    def load():
        holder["registry"].register("both")(Both)
        return Both

    registry, _ = _registry(monkeypatch, FakeEntryPoint("both-alias", load))
    holder["registry"] = registry
    assert "both" in registry
    assert "both-alias" not in registry


def test_broken_entry_point_only_warns(monkeypatch):
    class Good(Method):
        """Good."""

    def broken():
        raise ImportError("No module named 'missing_dependency'")

    registry, _ = _registry(
        monkeypatch,
        FakeEntryPoint("broken", broken, dist=("broken-pkg", "0.1")),
        FakeEntryPoint("good", lambda: Good),
    )
    with pytest.warns(UserWarning) as caught:
        names = registry.names()
    assert names == ["good"]
    messages = [str(w.message) for w in caught]
    assert any(
        "could not load method plugin 'broken' from package broken-pkg 0.1" in m
        and "missing_dependency" in m
        for m in messages
    ), messages
    # Later lookups neither warn again nor fail.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get("good") is Good
    with pytest.raises(UnknownPluginError):
        registry.get("broken")


def test_entry_point_clashing_with_an_existing_name_only_warns(monkeypatch):
    holder = {}

    class Original(Method):
        """Original."""

    class Impostor(Method):
        """Impostor."""

    def load():
        holder["registry"].register("same")(Original)
        return Impostor

    registry, _ = _registry(monkeypatch, FakeEntryPoint("same", load, dist=("clash", "2.0")))
    holder["registry"] = registry
    with pytest.warns(UserWarning, match="could not load method plugin 'same'.*already registered"):
        assert registry.get("same") is Original
