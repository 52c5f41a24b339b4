"""The modules of cmid_jax import each other without cycles, so the layers stay layers.

The graph is read from the source (an AST walk, nothing is imported), with every `import` and
`from ... import` statement of a module, those inside functions included (a function-level import
hides a cycle from the interpreter, not from the design). The rules:

* `import cmid_jax.a.b` is an edge to `cmid_jax.a.b`; importing a package means its `__init__`.
* `from cmid_jax.a import name` is an edge to `cmid_jax.a.name` when that is a module (a submodule
  of a package), else to `cmid_jax.a` (a name defined by that module or package `__init__`).
* Relative imports are resolved against the importing module's package.
* Parent packages are not edges: `from cmid_jax.data.bands import x` is an edge to
  `cmid_jax.data.bands` only, although Python also runs `cmid_jax/data/__init__.py` first.
  Counting those would make a cycle of every package whose `__init__` re-exports its submodules.
* Only modules of cmid_jax are nodes; third-party and standard-library imports are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = 'cmid_jax'
# Pure arithmetic shared by the backbones, the step FLOP count and the PyTorch reference.
FLOP_LEAF = 'cmid_jax.flop_counts'
# numpy helpers shared by the backbones' PyTorch key layouts and cmid_jax.convert.
STATE_DICT_LEAF = 'cmid_jax.state_dict'


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (`__init__` = the package)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob('*.py')):
        parts = list(path.relative_to(root).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        modules['.'.join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that module `name` (file `path`) imports, by the rules above."""
    is_package = path.name == '__init__.py'
    package = name if is_package else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[: len(base) - (node.level - 1)]
                if node.module:
                    base.append(node.module)
                source = '.'.join(base)
            else:
                source = node.module
            for alias in node.names:
                submodule = f'{source}.{alias.name}'
                found.add(submodule if submodule in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_rules_on_a_small_package(tmp_path):
    files = {
        '__init__.py': '',
        'a.py': 'def f():\n    from cmid_jax.sub import c  # a submodule\n',
        'b.py': 'from .sub.c import g\nimport cmid_jax.a\n',
        'sub/__init__.py': 'from cmid_jax.sub.c import g\n',
        'sub/c.py': 'from cmid_jax.sub import d\nfrom .. import b\nimport os\n',
        'sub/d.py': 'from cmid_jax.sub import VALUE  # the package __init__\n',
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        'cmid_jax': set(),
        'cmid_jax.a': {'cmid_jax.sub.c'},
        'cmid_jax.b': {'cmid_jax.sub.c', 'cmid_jax.a'},
        'cmid_jax.sub': {'cmid_jax.sub.c'},
        'cmid_jax.sub.c': {'cmid_jax.sub.d', 'cmid_jax.b'},
        'cmid_jax.sub.d': {'cmid_jax.sub'},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and 'cmid_jax.sub.c' in cycle
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:])), cycle
    graph['cmid_jax.sub.c'] = set()
    assert find_cycle(graph) is None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_flop_formulas_are_a_leaf():
    graph = import_graph()
    assert FLOP_LEAF in graph
    assert graph[FLOP_LEAF] == set()
    # The lower layer never reaches up: no backbone module imports perf.
    for name, targets in graph.items():
        if name.startswith('cmid_jax.models'):
            assert not {t for t in targets if t.startswith('cmid_jax.perf')}, name


def test_the_models_stay_below_convert():
    graph = import_graph()
    assert graph[STATE_DICT_LEAF] == set()
    for name, targets in graph.items():
        if name.startswith('cmid_jax.models'):
            assert not {t for t in targets if t.startswith('cmid_jax.convert')}, name
