"""The import graph points down (docs/architecture.md): read from the source's own imports,
those inside functions included, so a lazy import cannot hide an upward arrow."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxres"

# floor of each part of jaxres: a part may import only parts on lower floors (and itself)
FLOORS = {
    "choices": 0, "files": 0, "orbax_errors": 0, "orbax_manager": 0, "preemption": 0, "records": 0, "trees": 0, "imagenet_stats": 0,
    "data": 1, "models": 1, "workdir": 1,
    "weights": 2, "nnx": 2,
    "configs": 2,  # the recipes: base_config and the models they name; train reads them by name
    "analysis": 3,  # reads trained nets from workdirs and from weights files
    "train": 4,  # runs the analysis monitor during training
    "bench": 5, "experiments": 5,
    "cli": 6,
}


def part_of(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_parts(path: pathlib.Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from jaxres import data` imports the part `data`; `__version__` is no part
            modules = [f"{node.module}.{a.name}" for a in node.names] if node.module == "jaxres" else [node.module]
        else:
            continue
        parts.update(m.split(".")[1] for m in modules if m.startswith("jaxres.") and m.split(".")[1] in FLOORS)
    return parts


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_has_a_floor():
    parts = {part_of(p) for p in SOURCES}
    assert parts <= set(FLOORS), f"give {sorted(parts - set(FLOORS))} a floor here and in docs/architecture.md"
    assert set(FLOORS) <= parts, f"{sorted(set(FLOORS) - parts)} no longer exist: drop them from FLOORS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    part = part_of(path)
    upward = sorted(p for p in imported_parts(path) - {part} if FLOORS[p] >= FLOORS[part])
    assert not upward, f"{path.relative_to(ROOT)} (floor {FLOORS[part]}) imports {upward} on the same floor or above"


def test_import_jaxres_loads_no_jax():
    code = "import sys, jaxres; print(sorted(m for m in ('jax', 'flax', 'jaxres.models') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_every_top_level_name_resolves_to_its_defining_module():
    import jaxres

    assert set(jaxres.__all__) == set(jaxres._EXPORTS) | {"__version__"}
    for name, module in jaxres._EXPORTS.items():
        assert getattr(jaxres, name).__module__.startswith(module), name
    assert jaxres.pretrained is jaxres.weights.pretrained and jaxres.create_model is jaxres.models.create_model


def test_generic_helpers_are_imported_from_the_ground_floor():
    helpers = {n.name for n in ast.parse((PACKAGE / "choices.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    detours = [
        f"{path.relative_to(ROOT)}: {alias.name} from {node.module}"
        for path in SOURCES + sorted((ROOT / "tests").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxres") and node.module != "jaxres.choices"
        for alias in node.names if alias.name in helpers
    ]
    assert not detours, f"import these from jaxres.choices: {detours}"
