"""The layering of ARCHITECTURE.md, checked on every import of the tree (module-level and inside functions).

Data flows one way, so a module may import only its own layer and the layers listed under it in ``MAY_IMPORT``;
a new top-level module fails here until it is given a layer, so the picture stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlreason", "rewards", "tasks")

LAYER_OF = {
    "rewards": "rewards",
    "tasks": "tasks",
    "rlreason": "foundation",
    "rlreason.config": "foundation",
    "rlreason.models": "foundation",
    "rlreason.data": "foundation",
    "rlreason.scoring": "foundation",
    "rlreason.onednn": "foundation",
    "rlreason.rollout": "rollout",
    "rlreason.objective": "objective",
    "rlreason.observe": "observe",
    "rlreason.training": "training",
    "rlreason.cli": "cli",
    "rlreason.train": "cli",
    "rlreason.__main__": "cli",
}
"""Module or package -> its layer; the longest matching prefix wins, except that ``rlreason`` (whose
``__init__`` holds only the version) passes its layer to no module: each of its modules needs its own entry."""

FOUNDATION = {"rewards", "tasks", "foundation"}
MAY_IMPORT = {
    "rewards": set(),
    "tasks": {"rewards"},
    "foundation": {"rewards", "tasks"},
    "rollout": FOUNDATION,
    "objective": FOUNDATION,
    "observe": FOUNDATION | {"rollout"},
    "training": FOUNDATION | {"rollout", "objective", "observe"},
    "cli": FOUNDATION | {"rollout", "objective", "observe", "training"},
}
"""Layer -> the other layers it may import. Rollout and objective are siblings: engines know nothing of losses,
losses nothing of engines. Observe reads runs and runs an engine for evaluation, but never drives training."""


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    shortest = 2 if parts[0] == "rlreason" and len(parts) > 1 else 1
    for n in range(len(parts), shortest - 1, -1):
        layer = LAYER_OF.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """Every project module ``source`` imports, with its line: ``from a import b`` names ``a.b`` when that is a
    module, and relative imports are resolved against ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, node.lineno))
    return [(target, line) for target, line in dict.fromkeys(found) if target.split(".")[0] in PACKAGES]


def violations(imports: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per import that crosses the layering the wrong way, or per module without a layer."""
    problems = []
    for module, targets in sorted(imports.items()):
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module}: no layer; add it to LAYER_OF (and ARCHITECTURE.md)")
            continue
        for target, line in targets:
            target_layer = layer_of(target)
            if target_layer is None:
                problems.append(f"{module}:{line} imports {target}, which has no layer")
            elif target_layer != layer and target_layer not in MAY_IMPORT[layer]:
                problems.append(f"{module}:{line} imports {target}: {layer} may not import {target_layer}")
    return problems


def tree_imports() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    known = set(modules)
    return {
        module: imports_of(path.read_text(), module, path.name == "__init__.py", known)
        for module, path in modules.items()
    }


def test_no_module_imports_a_layer_above_it():
    assert violations(tree_imports()) == []


def test_every_layer_is_in_architecture_md():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert [layer for layer in MAY_IMPORT if f"**{layer}**" not in text] == []


WRONG_IMPORTS = [
    ("rewards.math", "rlreason.training.trainer", "rewards may not import training"),
    ("rlreason.objective.losses", "rlreason.rollout.engine", "objective may not import rollout"),
    ("rlreason.observe.evaluate", "rlreason.training", "observe may not import training"),
    ("rlreason.config", "rlreason.cli", "foundation may not import cli"),
]


@pytest.mark.parametrize(("module", "target", "reason"), WRONG_IMPORTS, ids=[w[0] for w in WRONG_IMPORTS])
def test_the_checker_names_a_wrong_import(module, target, reason):
    assert violations({module: [(target, 7)]}) == [f"{module}:7 imports {target}: {reason}"]


def test_the_checker_names_a_module_without_a_layer():
    assert violations({"rlreason.newstage": [("rewards", 1)]}) == [
        "rlreason.newstage: no layer; add it to LAYER_OF (and ARCHITECTURE.md)"
    ]


def test_the_checker_allows_imports_down_and_within_a_layer():
    allowed = {
        "rlreason.observe.evaluate": [("rlreason.rollout.engine", 1), ("rlreason.observe.passk", 2)],
        "rlreason.training.trainer": [("rlreason.objective.losses", 1), ("tasks.registry", 2)],
        "tasks.logic": [("rewards.answer_grammar", 1)],
    }
    assert violations(allowed) == []


def test_imports_inside_functions_and_relative_ones_are_seen():
    source = "import torch\nfrom . import engine\n\ndef f():\n    from rlreason import training\n    import rewards.math\n"
    known = {"rlreason.rollout.engine", "rlreason.training", "rewards.math"}
    found = imports_of(source, "rlreason.rollout.fast", False, known)
    assert found == [("rlreason.rollout.engine", 2), ("rlreason.training", 5), ("rewards.math", 6)]
    assert violations({"rlreason.rollout.fast": found}) == [
        "rlreason.rollout.fast:5 imports rlreason.training: rollout may not import training"
    ]
