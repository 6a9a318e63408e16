"""The package's layering: which room may import which, read from every import statement in fusionpipe/.

The rooms are the three stages, the recipes that drive them, and the shared modules below them all:

    shared   every other module at the top: errors, atomic, device, manifest, audio, store, corpora/, ...
    extract  stage 1: run the upstreams, cache every layer
    fuse     stage 2: align and merge the caches, lazily; batches for stage 3
    train    stage 3: interface + head, trained from stage 2's batches
    analyze  what the layers say: CKA between upstreams' layers (stores), layer use of trained interfaces (runs)
    ablate   a recipe's grid over all stages
    predict  a trained run on raw audio: stage 1's upstreams, stage 2's alignment, stage 3's variant
    cli      the typer app: thin wrappers over the library
    main     `python -m fusionpipe`

ALLOWED below is the specification; a stage that needs another stage's code is a sign that the code
belongs in a shared module (as resolve_device moved to device.py, shard to fuse/loader.py).
Besides the table, no module may import another module's private (_underscored) name.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fusionpipe"

ROOMS = ("extract", "fuse", "train", "analyze", "ablate", "predict", "cli")  # subpackages, and cli.py; the rest of the top is shared

# importer room -> the rooms it may import (its own included)
ALLOWED = {
    "shared":  {"shared"},
    "extract": {"shared", "extract"},
    "fuse":    {"shared", "fuse"},
    "train":   {"shared", "fuse", "train"},
    "analyze": {"shared", "fuse", "train", "analyze"},
    "ablate":  {"shared", "extract", "fuse", "train", "analyze", "ablate"},
    "predict": {"shared", "extract", "fuse", "train", "predict"},
    "cli":     {"shared", "extract", "fuse", "train", "analyze", "ablate", "predict", "cli"},
    "main":    {"cli"},
}
# the package itself is shared, but its `fusionpipe.load` returns a trained run's model (imported lazily)
ALSO_ALLOWED = {"fusionpipe": {"predict"}}


def room(module: str) -> str:
    """The room of a dotted module name inside the package: fusionpipe.fuse.view -> 'fuse',
    fusionpipe.store -> 'shared'."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top == "__main__":
        return "main"
    return top if top in ROOMS else "shared"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    """Whether a dotted name inside the package is a module or subpackage (not a name in one)."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def is_private(name: str) -> bool:
    """_x is private; __version__ and other dunders are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module, bound name or None, imported name or None) for every import of a
    fusionpipe module in the tree, at any depth (function-level imports included)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fusionpipe":  # only `as` binds the module itself to a name
                    yield node.lineno, alias.name, alias.asname, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "fusionpipe":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if is_module(full):
                    yield node.lineno, full, alias.asname or alias.name, None
                else:
                    yield node.lineno, source, None, alias.name


def violations(source: str, module: str, path: str, is_package: bool = False) -> list[tuple[str, str]]:
    """Every broken rule in one module's source as (rule, 'path:line: what'), in line order.
    The rules: 'room' (ALLOWED), 'cli' (only __main__ imports the CLI), 'private'."""
    tree = ast.parse(source, filename=path)
    importer = room(module)
    found = []
    module_aliases = {}  # a name bound to an imported fusionpipe module -> that module
    for line, target, bound, name in imports(tree, module, is_package):
        where = f"{path}:{line}"
        imported = room(target)
        if imported == "cli" and importer not in ("main", "cli"):
            found.append((line, "cli", f"{where}: imports {target} (only __main__ may)"))
        elif imported not in ALLOWED[importer] | ALSO_ALLOWED.get(module, set()):
            found.append((line, "room", f"{where}: {importer} imports {imported} ({target})"))
        if name is not None and is_private(name):
            found.append((line, "private", f"{where}: imports the private name {name} of {target}"))
        if any(is_private(part) for part in target.split(".")):
            found.append((line, "private", f"{where}: imports the private module {target}"))
        if bound is not None:
            module_aliases[bound] = target
    for node in ast.walk(tree):  # m._x where m names an imported fusionpipe module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in module_aliases and is_private(node.attr):
            found.append((node.lineno, "private", f"{path}:{node.lineno}: uses the private name {node.attr} "
                                                  f"of {module_aliases[node.value.id]}"))
    return [(rule, what) for _, rule, what in sorted(found)]


def package_violations(rule: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += [what for r, what in violations(path.read_text(), module_name(path),
                                                 str(path.relative_to(PACKAGE.parent)),
                                                 is_package=path.name == "__init__.py") if r == rule]
    return found


def test_checker_catches_planted_violations():
    """The checker itself, on a module planted in stage 2: every kind of violation is named with its line."""
    planted = "\n".join([
        "from fusionpipe.store import FeatureStore",          # 1 shared: fine
        "from fusionpipe.fuse.view import open_fused",        # 2 own room: fine
        "from fusionpipe import __version__",                 # 3 a dunder is not private
        "from fusionpipe.extract.stage import extract",       # 4 stage 2 -> stage 1
        "def f():",
        "    from ..train import loop",                       # 6 stage 2 -> stage 3, relative, in a function
        "    from fusionpipe.cli import app",                 # 7 the CLI
        "from fusionpipe.store import _private",              # 8 a private name
        "import fusionpipe.manifest as m",
        "m._hidden()",                                        # 10 a private name by attribute
        "from fusionpipe import train",                       # 11 stage 3, as a subpackage
    ])
    found = violations(planted, "fusionpipe.fuse.planted", "fusionpipe/fuse/planted.py")
    assert found == [
        ("room", "fusionpipe/fuse/planted.py:4: fuse imports extract (fusionpipe.extract.stage)"),
        ("room", "fusionpipe/fuse/planted.py:6: fuse imports train (fusionpipe.train.loop)"),
        ("cli", "fusionpipe/fuse/planted.py:7: imports fusionpipe.cli (only __main__ may)"),
        ("private", "fusionpipe/fuse/planted.py:8: imports the private name _private of fusionpipe.store"),
        ("private", "fusionpipe/fuse/planted.py:10: uses the private name _hidden of fusionpipe.manifest"),
        ("room", "fusionpipe/fuse/planted.py:11: fuse imports train (fusionpipe.train)"),
    ]


def test_checker_sees_every_module_of_the_package():
    """Not vacuous: the walk finds the rooms' modules and their imports of one another."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert {"fusionpipe.cli", "fusionpipe.extract.stage", "fusionpipe.fuse.view", "fusionpipe.train.loop",
            "fusionpipe.ablate.plan", "fusionpipe.store"} <= modules
    view = PACKAGE / "fuse" / "view.py"
    targets = {t for _, t, _, _ in imports(ast.parse(view.read_text()), "fusionpipe.fuse.view", False)}
    assert "fusionpipe.store" in targets


def test_each_room_imports_only_the_rooms_its_row_of_the_table_allows():
    found = package_violations("room")
    assert not found, "a room imports one it may not (see ALLOWED in tests/test_layers.py):\n" + "\n".join(found)


def test_only_main_imports_the_cli():
    found = package_violations("cli")
    assert not found, "the library imports the CLI; move what it needs out of cli.py:\n" + "\n".join(found)


def test_no_module_imports_another_modules_private_name():
    found = package_violations("private")
    assert not found, "private names used across modules; make them public or move them:\n" + "\n".join(found)


# The run directory has one owner: its files are named in train/rundir.py and nowhere else in the package,
# so that a reader elsewhere (the report, the analysis, the CLI) cannot bypass its legacy mapping or checks.
RUN_FILES = {"task.json", "last.pt", "best.pt", "results.json", "test.json", "log.csv"}
RUN_OWNER = PACKAGE / "train" / "rundir.py"


def run_file_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, file name) of every string constant in the tree that names a run directory's file."""
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RUN_FILES]


def test_only_the_run_directory_module_names_a_run_directorys_files():
    assert {name for _, name in run_file_names(ast.parse(RUN_OWNER.read_text()))} == RUN_FILES  # not vacuous
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: names {name}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != RUN_OWNER
             for line, name in run_file_names(ast.parse(path.read_text()))]
    assert not found, "read and write run files through train/rundir.py (RunDir):\n" + "\n".join(found)
