"""The install and the command's start-up: what pyproject.toml declares matches what the code
imports, `jaxres --help` stays instant, and a missing extra is named in one line."""

import argparse
import ast
import functools
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import jaxres
from jaxres import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Distributions used as tools rather than imported: pytest runs the tests, pytest-xdist is its plugin.
TOOLS = {"pytest", "pytest-xdist"}
# Installed under another distribution name than the one declared (tensorflow-cpu installs `tensorflow`).
DECLARED_AS = {"tensorflow": "tensorflow-cpu"}


def declared() -> dict[str, set[str]]:
    """extra ("" for the core) -> the canonical distribution names it declares, jaxres[...] expanded."""
    groups = {"": PYPROJECT["dependencies"], **PYPROJECT["optional-dependencies"]}
    names = {extra: {canonicalize_name(Requirement(r).name) for r in reqs} for extra, reqs in groups.items()}
    for extra, reqs in groups.items():
        for r in map(Requirement, reqs):
            if r.name == "jaxres":
                names[extra] |= set().union(*(names[e] for e in r.extras))
    for extra in names:
        names[extra].discard("jaxres")
    return names


@functools.cache
def third_party_imports(*dirs: str) -> dict[str, str]:
    """Top-level module name -> a file importing it, for every absolute import in the .py files
    under `dirs` that is neither standard library nor this repository's own code."""
    # scripts import their siblings by top-level name
    local = {"jaxres", "tests"} | {p.stem for d in dirs for p in (ROOT / d).iterdir()}
    found = {}
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    dists = installed_modules().get(module) or [DECLARED_AS.get(module, module)]
    return {canonicalize_name(DECLARED_AS.get(d.lower(), d)) for d in dists}


def test_every_imported_package_is_declared():
    all_declared = set().union(*declared().values())
    undeclared = {module: where for module, where in third_party_imports("jaxres", "tests", "experiments").items()
                  if not distributions_of(module) & all_declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_package_is_imported():
    imported = set().union(*(distributions_of(m) for m in third_party_imports("jaxres", "tests", "experiments")))
    installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    unused = set().union(*declared().values()) - imported - TOOLS
    # A declared distribution that is not installed here (torch, tensorflow-cpu) cannot be mapped
    # to its module names; those are checked where installed.
    assert not unused & installed, f"declared in pyproject.toml but never imported: {sorted(unused & installed)}"


def test_core_declares_only_the_zoo():
    # `import jaxres; jaxres.create_model(...)`, `jaxres.pretrained(name, path)` need only these
    # (checked in a venv with the core alone; README "Install").
    assert declared()[""] == {"jax", "flax", "numpy", "safetensors"}


@pytest.mark.parametrize("package, extra", [(p, e) for p, e in cli.PACKAGE_EXTRAS.items() if e])
def test_package_extras_match_pyproject(package, extra):
    assert distributions_of(package) & declared()[extra], f"{package} is not in jaxres[{extra}]"


def test_shared_packages_are_in_every_extra_of_their_commands():
    for package, extra in cli.PACKAGE_EXTRAS.items():
        if extra is None:
            for command, command_extra in cli.COMMAND_EXTRAS.items():
                for e in command_extra.split(","):
                    assert distributions_of(package) & declared()[e], f"jaxres {command} names jaxres[{e}] for {package}"


@pytest.mark.parametrize("command, missing, expected", [
    ("train", "ml_collections", "pip install 'jaxres[train]'"),
    ("data", "PIL.Image", "pip install 'jaxres[train]'"),
    ("analyze", "matplotlib.pyplot", "pip install 'jaxres[analysis]'"),
    ("analyze", "tqdm", "pip install 'jaxres[analysis]'"),        # tqdm is in [train] and [analysis]
    ("train", "tqdm", "pip install 'jaxres[train]'"),
    ("experiment", "orbax", "pip install 'jaxres[train,analysis]'"),
    ("convert", "torch", "pip install 'jaxres[torch]'"),
    ("models", "huggingface_hub", "pip install 'jaxres[hub]'"),
])
def test_missing_extra_message_names_the_extra(command, missing, expected):
    message = cli.missing_extra_message(command, ModuleNotFoundError(f"No module named '{missing}'", name=missing))
    assert message.startswith(f"jaxres {command}: error: this command needs {missing.split('.')[0]}")
    assert message.endswith(expected)


def test_missing_module_of_our_own_is_not_blamed_on_an_extra():
    assert cli.missing_extra_message("train", ModuleNotFoundError("x", name="jaxres.nothing")) is None


def test_help_lines_match_the_commands_modules():
    for name, help_line in cli.COMMANDS.items():
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"jaxres.cli.{name}").register(subparsers)
        (choice,) = subparsers._choices_actions
        assert (choice.dest, choice.help) == (name, help_line)


def run_cli(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_help_and_version_do_not_import_jax():
    out = run_cli(
        "import sys\n"
        "from jaxres.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('jax', 'flax', 'numpy', 'optax') if m in sys.modules))\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-2] == f"jaxres {jaxres.__version__}"
    assert lines[-1] == "[]"
    assert all(name in out.stdout for name in cli.COMMANDS)


@pytest.mark.slow
def test_an_installed_wheel_finds_the_recipes_by_name(tmp_path):
    # Built from a copy of the sources (a build in the checkout would leave build/ there) and
    # imported from the install alone, outside the checkout: the recipes travel as modules.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "jaxres", source / "jaxres", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("jaxres-*.whl")
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import jaxres.configs\n"
            "from jaxres.train import load_config\n"
            "assert jaxres.configs.__file__.startswith(sys.argv[1]), jaxres.configs.__file__\n"
            "print(jaxres.configs.recipe_names(), load_config('cifar10:resnet56').model)\n")
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["('cifar10',", "'degradation',", "'fashion_mnist',", "'imagenet',", "'synthetic')",
                                  "cifar_resnet56"]


def test_version_is_the_installed_distributions():
    assert importlib.metadata.version("jaxres") == jaxres.__version__


def test_a_command_missing_its_extra_fails_in_one_line(tmp_path):
    # As in a core-only install: the [train] packages cannot be imported.
    blocked = ["optax", "ml_collections", "grain", "tensorflow_datasets", "tensorboardX", "PIL"]
    out = run_cli(
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "from jaxres.cli import main\n"
        f"sys.exit(main(['train', '--config', 'cifar10:resnet20', '--workdir', {str(tmp_path)!r}]))\n")
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("jaxres train: error: this command needs ")
    assert out.stderr.rstrip().endswith("pip install 'jaxres[train]'")


def test_license_matches_pyproject():
    assert PYPROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (ROOT / "jaxres" / "py.typed").is_file()


def oldest_python_violations(source: str) -> list[str]:
    """f-string constructs Python 3.12 accepts (PEP 701) and the oldest supported Python, 3.11,
    rejects: a quote of an enclosing f-string reused inside it, or a backslash in a replacement
    field. The main leg runs 3.12+, whose parser accepts both, so this is read from its tokens."""
    import io
    import tokenize

    found, stack = [], []  # stack: (opening quote, depth of replacement-field braces) per open f-string
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[tok.type]
        inside = bool(stack)
        if name in ("STRING", "FSTRING_START") and inside:
            prefix_end = len(tok.string) - len(tok.string.lstrip("rRbBuUfF"))
            quote = tok.string[prefix_end:prefix_end + 3]
            quote = quote if quote in ('"""', "'''") else quote[0]
            if any(quote[0] == outer[0] for outer, _ in stack):
                found.append(f"line {tok.start[0]}: {quote} reused inside an f-string opened with the same quote")
        if name == "FSTRING_START":
            text = tok.string.lstrip("rRbBfF")
            stack.append((text[:3] if text[:3] in ('"""', "'''") else text[0], 0))
        elif name == "FSTRING_END":
            stack.pop()
        elif inside and name != "FSTRING_MIDDLE" and "\\" in tok.string:
            found.append(f"line {tok.start[0]}: backslash inside an f-string replacement field")
    return found


@pytest.mark.skipif(sys.version_info < (3, 12), reason="reads the 3.12 f-string tokens; 3.11 compiles directly")
def test_sources_parse_on_the_oldest_supported_python():
    # requires-python says 3.11; CI's main leg runs the newest Python, which would accept these.
    assert PYPROJECT["requires-python"] == ">=3.11"
    assert oldest_python_violations("x = f\"{' / '.join(f'{r['m']}' for r in v)}\"")  # the check can fail
    assert not oldest_python_violations("x = f\"{' / '.join(f'{r[1]}' for r in v)}\"")
    bad = {str(p.relative_to(ROOT)): v for p in sorted(ROOT.glob("[jted]*/**/*.py"))
           if ".venv" not in p.parts and (v := oldest_python_violations(p.read_text()))}
    assert not bad, f"3.12-only f-string syntax (requires-python is >=3.11): {bad}"
