"""The package's structure holds: no import cycle inside ``kvc_compile``, and no import against the
layers (``tests/import_graph.py``: foundation < methods < compression < kernels < config < ops <
cache < passes < backend/reference < export targets < engine < eval/bench < cli)."""

from __future__ import annotations

import pytest
from import_graph import LAYERS, cycles, import_graph, layer_of, module_files, upward_imports


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == [], "import cycles inside kvc_compile (break them by moving code down a layer)"


def test_no_import_against_the_layers(graph):
    assert upward_imports(graph) == [], "imports from a higher layer (see LAYERS in tests/import_graph.py)"


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)  # raises for a module no layer names


def test_the_checks_catch_what_they_look_for():
    """A cycle through a lazy import and an upward import are both reported."""
    toy = {
        "kvc_compile.methods.base": {"kvc_compile.methods.snapkv"},  # e.g. a lazy import inside a method
        "kvc_compile.methods.snapkv": {"kvc_compile.methods.base"},
        "kvc_compile.methods.knorm": {"kvc_compile.ops.compress"},  # methods must not know the ops
        "kvc_compile.ops.compress": {"kvc_compile.methods.base"},
    }
    assert cycles(toy) == [["kvc_compile.methods.base", "kvc_compile.methods.snapkv"]]
    assert upward_imports(toy) == [("kvc_compile.methods.knorm", "kvc_compile.ops.compress")]
    assert layer_of("kvc_compile.plugins.onnx.runtime") > layer_of("kvc_compile.ops") > layer_of("kvc_compile.plugins")
    assert len({prefix for layer in LAYERS for prefix in layer}) == sum(map(len, LAYERS))


def test_lazy_imports_count(tmp_path):
    """An import inside a function is a dependency; one under ``if TYPE_CHECKING:`` is not."""
    package = tmp_path / "kvc_compile"
    (package / "methods").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "methods" / "__init__.py").write_text("")
    (package / "methods" / "base.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kvc_compile.ops import thing\n"
        "def score():\n    from kvc_compile.methods import snapkv\n")
    (package / "methods" / "snapkv.py").write_text("from kvc_compile.methods.base import score\n")
    (package / "ops.py").write_text("")
    graph = import_graph(package)
    assert graph["kvc_compile.methods.base"] == {"kvc_compile.methods.snapkv"}
    assert cycles(graph) == [["kvc_compile.methods.base", "kvc_compile.methods.snapkv"]]
