"""The import graph of jaxalign is one-way: no cycles (none hidden inside functions either), and each layer
imports only the layers below it:

    jaxalign (JaxalignError, __version__), tree, parallel/, checkpoint, rundir, rewards   (leaves)
      <- models/ (Flax modules, configs, presets; no file I/O)
      <- lora (LoRA math; no file I/O)
      <- convert/ (HF layouts and safetensors: hf.py; PEFT adapter files: peft.py)
      <- loading (LM, from_pretrained, from_config, load_config)
      <- data/, losses/, sampling/
      <- train/
      <- config (its skeleton is built from the task registry)
      <- quickstart, plot
      <- cli

Read statically with `ast` (nothing is imported): module-level and function-level imports, `import a.b`,
`from a import b` (b a submodule or a name), relative imports. Importing `jaxalign.a.b` runs the packages
`jaxalign` and `jaxalign.a` first, so those edges count too; except the implied edge from a module to a
package it is itself inside (Python has already started that package before the module runs: counting it
would flag every package whose __init__ re-exports a submodule that imports a sibling). An explicit import
of an enclosing package (`from jaxalign.models import abstract_params` inside models/) does count.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxalign")

# Layers, lowest first: a module may import its own layer and the ones below. Each entry: a module or a
# package (the package and everything under it).
LAYERS = [
    ("base", ("jaxalign", "jaxalign.tree", "jaxalign.parallel", "jaxalign.checkpoint", "jaxalign.rundir",
              "jaxalign.rewards")),
    ("models", ("jaxalign.models",)),
    ("lora", ("jaxalign.lora",)),
    ("convert", ("jaxalign.convert",)),
    ("loading", ("jaxalign.loading",)),
    ("data/losses/sampling", ("jaxalign.data", "jaxalign.losses", "jaxalign.sampling")),
    ("train", ("jaxalign.train",)),
    ("config", ("jaxalign.config",)),
    ("front ends", ("jaxalign.quickstart", "jaxalign.plot")),
    ("cli", ("jaxalign.cli",)),
]
# Leaves of the base layer: what each may import from jaxalign (besides its own package's modules).
LEAVES = {"jaxalign.tree": set(), "jaxalign.checkpoint": {"jaxalign", "jaxalign.tree"},
          "jaxalign.parallel": {"jaxalign"}, "jaxalign.rundir": {"jaxalign"}}
# Third-party packages that mean file I/O, kept out of the layers that do none.
IO_PACKAGES = {"safetensors", "orbax", "shutil", "tempfile"}
NO_IO = ("jaxalign.models", "jaxalign.lora")


def module_files() -> dict:
    """{dotted module name: (path, is_package)} for every .py file under jaxalign/."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[: -len(".py")].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            out[".".join(rel[:-1] if is_pkg else rel)] = (os.path.join(d, f), is_pkg)
    return out


MODULES = module_files()


def ancestors(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports(name: str, source: str = None):
    """[(imported module, line, explicit)] of one module, every import statement anywhere in it.
    Third-party modules are returned too (their top-level name), explicit."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(source if source is not None else open(path).read(), path)
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "jaxalign":
                out.append((t.split(".")[0], node.lineno, True))
                continue
            out.append((t, node.lineno, True))
            out.extend((a, node.lineno, False) for a in ancestors(t))
    return out


def graph(sources: dict = None) -> dict:
    """{module: {imported jaxalign module: line}}; `sources` replaces some modules' text (for the self-test)."""
    sources = sources or {}
    g = {}
    for name in MODULES:
        edges = {}
        for t, line, explicit in imports(name, sources.get(name)):
            if t not in MODULES or t == name:
                continue
            if not explicit and t in ancestors(name):
                continue  # an enclosing package: already started before this module runs
            edges.setdefault(t, line)
        g[name] = edges
    return g


def find_cycle(g: dict):
    """One cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def describe(g, cycle) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} imports {b} ({MODULES[a][0]}:{g[a][b]})" for a, b in zip(cycle, cycle[1:]))


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if within(name, p) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{name}: not in any layer of tests/test_imports.py LAYERS; add it to one"
    return best[0]


def test_modules_found():
    assert {"jaxalign", "jaxalign.models", "jaxalign.lora", "jaxalign.loading", "jaxalign.convert.hf",
            "jaxalign.convert.peft", "jaxalign.tree", "jaxalign.cli"} <= set(MODULES)


def test_no_import_cycles():
    g = graph()
    cycle = find_cycle(g)
    assert cycle is None, "import cycle:\n" + describe(g, cycle)


def test_top_level_package_imports_no_submodule():
    bad = [(t, line) for t, line, _ in imports("jaxalign") if t.startswith("jaxalign")]
    assert not bad, f"jaxalign/__init__.py must only define JaxalignError/__version__; it imports {bad}"


def test_layers_import_only_downwards():
    g = graph()
    bad = []
    for a, edges in g.items():
        for b, line in edges.items():
            if layer_of(b) > layer_of(a):
                bad.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}): "
                           f"{MODULES[a][0]}:{line}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves(leaf):
    allowed = LEAVES[leaf]
    bad = [f"{a} imports {b} ({MODULES[a][0]}:{line})" for a, edges in graph().items() if within(a, leaf)
           for b, line in edges.items() if b not in allowed and not within(b, leaf)]
    assert not bad, "\n".join(bad)


def test_no_file_io_in_models_and_lora():
    bad = [f"{name} imports {t} ({MODULES[name][0]}:{line})" for name in MODULES
           if any(within(name, p) for p in NO_IO) for t, line, _ in imports(name)
           if t in IO_PACKAGES or within(t, "jaxalign.checkpoint") or within(t, "jaxalign.convert")]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_back_import():
    """The graph sees a function-level back-import (models -> loading) as a cycle and a layer violation,
    a relative import included."""
    path, _ = MODULES["jaxalign.models.config"]
    text = open(path).read()
    for back in ("def _f():\n    from jaxalign import loading\n",
                 "def _f():\n    from ..loading import from_pretrained\n",
                 "def _f():\n    import jaxalign.convert.peft\n"):
        g = graph({"jaxalign.models.config": text + "\n\n" + back})
        assert find_cycle(g) is not None, back
        assert any(layer_of(b) > layer_of("jaxalign.models.config") for b in g["jaxalign.models.config"]), back
