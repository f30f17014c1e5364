"""The package structure DESIGN.md promises: no import cycles, and the run loop, main.py, the CLI
and config.py name no model architecture (the family table does)."""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trainer", "data_pipeline", "launcher")


def modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found[module] = path
    return found


def imports(path: str, known: dict[str, str]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known}


def test_no_module_imports_a_module_that_imports_it_back():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    # every module that reaches itself again through the import graph is on a cycle
    on_cycles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                on_cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
    assert not on_cycles, f"modules on an import cycle: {sorted(on_cycles)}"


def test_the_loop_main_the_cli_and_config_name_no_architecture():
    names = re.compile(r"""["'](dcgan|mlp|stylegan2|cyclegan|pix2pix|esrgan)["']""")
    for path in ("trainer/run.py", "trainer/main.py", "trainer/config.py", "trainer/reporting.py", "trainer/core.py",
                 "launcher/cli.py"):
        code = [line for line in open(os.path.join(REPO, path)) if not line.lstrip().startswith("#")]
        found = [line.strip() for line in code if names.search(line.split("#")[0])]
        # config.py's one default value names the default family
        found = [line for line in found if not line.startswith('arch: str = "dcgan"')]
        assert not found, f"{path} names an architecture: {found}"
