"""The one plugin mechanism: registries filled by provider modules on first lookup, declared names listed
without importing, third-party providers through the ``medfm.plugins`` entry points, strict lookups."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import medfm.registry as registry_mod
from medfm.errors import ConfigError
from medfm.registry import Registry


def test_encoders_objectives_and_methods_come_from_one_mechanism():
    from medfm.modelcard import SECTIONS
    from medfm.models.registry import ENCODERS
    from medfm.tasks.adapt.registry import ADAPTERS
    from medfm.train import OBJECTIVES

    for reg in (ENCODERS, OBJECTIVES, ADAPTERS, SECTIONS):
        assert isinstance(reg, Registry)
    for family in ("vit_*", "resnet*", "convnext*", "hybrid*"):  # every family module provided its sizes
        assert ENCODERS.names(family), family
    assert OBJECTIVES.names() == ["contrastive", "mae"]
    assert {"linear", "knn", "prototype", "finetune", "lpft", "lora", "scratch"} <= set(ADAPTERS.names())
    assert {"encoder", "classifier", "clip", "segmenter"} <= set(SECTIONS.names())


def test_unknown_names_list_the_known_ones():
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import AdaptConfig
    from medfm.train.objectives import get_objective

    with pytest.raises(ConfigError, match="Known: .*vit_tiny"):
        create_encoder("vit_tinyy")
    with pytest.raises(ConfigError, match="known: .*linear"):
        AdaptConfig(methods=["magic"])
    with pytest.raises(ConfigError, match="Known: contrastive, mae"):
        get_objective("byol")


def test_listing_objectives_imports_no_lightning():
    """The CLI builds `medfm pretrain <objective>` from declared names: Lightning stays unimported."""
    code = ("import sys; from medfm.train import OBJECTIVES; names = OBJECTIVES.names(); "
            "assert names == ['contrastive', 'mae'], names; assert OBJECTIVES.describe('mae'); "
            "assert 'lightning' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_providers_are_imported_once_on_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "medfm_test_provider.py").write_text(
        "import medfm_test_hub\n"
        "CALLS = medfm_test_hub.CALLS\nCALLS.append('imported')\n"
        "@medfm_test_hub.REG.register('thing_a', help='the first thing')\n"
        "def thing_a(**kw):\n    return ('a', kw)\n")
    hub = type(sys)("medfm_test_hub")
    hub.REG = Registry("thing", providers=("medfm_test_provider",))
    hub.CALLS = []
    monkeypatch.setitem(sys.modules, "medfm_test_hub", hub)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hub.CALLS == []  # nothing imported by creating the registry
    assert hub.REG.create("thing_a", x=1) == ("a", {"x": 1})
    assert hub.REG.names() == ["thing_a"] and hub.REG.describe("thing_a") == "the first thing"
    assert hub.CALLS == ["imported"]
    with pytest.raises(KeyError, match="Unknown thing 'thing_b'. Known: thing_a"):
        hub.REG.get("thing_b")
    with pytest.raises(ValueError, match="already registered"):
        hub.REG.register("thing_a")(lambda: None)


def test_third_party_plugins_come_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "medfm_test_plugin.py").write_text(
        "import medfm_test_hub2\n"
        "@medfm_test_hub2.REG.register('plugged')\n"
        "def plugged():\n    '''A third-party thing.'''\n    return 'plugged'\n")
    hub = type(sys)("medfm_test_hub2")
    hub.REG = Registry("widget")
    monkeypatch.setitem(sys.modules, "medfm_test_hub2", hub)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name="test", value="medfm_test_plugin", group=registry_mod.ENTRY_POINT_GROUP)]
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.setattr(registry_mod, "_plugins_loaded", False)
    assert hub.REG.create("plugged") == "plugged"
    assert hub.REG.describe("plugged") == "A third-party thing."


def test_declared_names_import_only_their_module(tmp_path, monkeypatch):
    (tmp_path / "medfm_test_declared.py").write_text(
        "import medfm_test_hub3\n"
        "@medfm_test_hub3.REG.register('slow')\n"
        "def slow():\n    return 'slow'\n")
    hub = type(sys)("medfm_test_hub3")
    hub.REG = Registry("objective-like")
    hub.REG.declare("slow", "medfm_test_declared", "a slow-to-import thing")
    monkeypatch.setitem(sys.modules, "medfm_test_hub3", hub)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_mod, "_plugins_loaded", True)
    assert hub.REG.names() == ["slow"] and hub.REG.describe("slow") == "a slow-to-import thing"
    assert "medfm_test_declared" not in sys.modules
    assert hub.REG.create("slow") == "slow"
    monkeypatch.delitem(sys.modules, "medfm_test_declared")
