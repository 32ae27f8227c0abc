"""The layout: the top level holds the design card's files, the rest lives in folders; every module
is in its layer, imports run only downwards or within a layer, no import cycle (function-level
imports included), one docstring per file saying what it holds, and the README's map naming exactly
the files and folders there are."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("plumbing", "experiments", "shapes")  # the packages beside the top-level files
# The layers, top to bottom; a module may import its own layer or lower.
LAYERS = {
    "scripts": ["train_ddpo", "train_alignprop", "train_prdp", "sample", "experiments.evaluate",
                "experiments.compare", "experiments.mechanism", "experiments.bench", "experiments.bench_parts", "experiments.gpu_check",
                "shapes.measure"],
    # the run lifecycle around every trainer (it loads models and rewards) and the evaluation it runs: both
    # sample with the sampling loop, so they sit above the library although they live with the plumbing
    "lifecycle": ["plumbing.lifecycle", "plumbing.evaluation"],
    "library": ["sampling", "explore", "lora", "rewards", "prompt_sets", "experiments.gpu_memory",
                "experiments.compare_stats", "experiments.pooling"],
    "models": ["pipelines", "shapes.build", "shapes.models", "shapes.world"],
    "plumbing": ["plumbing.configurator", "plumbing.runs", "plumbing.dashboards",
                 "plumbing.distributed", "plumbing.grids", "plumbing.hub", "plumbing.mixed_precision",
                 "plumbing.compiling"],
}
LEVEL = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
# The design card's top level, and the two files a trainer cannot be read without (where the model and
# the prompts come from).
TOP = {"train_ddpo", "train_alignprop", "train_prdp", "sample", "sampling", "explore", "lora", "rewards",
       "pipelines", "prompt_sets"}


def path(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def modules():
    """Every project module, dotted: the top-level files and the folders' files (not __init__)."""
    found = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    for d in FOLDERS:
        found += [f"{d}.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py") and f != "__init__.py"]
    return sorted(found)


def imports(module):
    """The project modules `module` imports anywhere in its file (top level or inside functions)."""
    return imports_in(open(path(module)).read(), set(modules()))


def imports_in(source, known):
    """The modules of `known` that `source` imports: `import a.b`, `from a import b` (b a module)
    and `from a.b import c` all name a.b."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & known


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def upward(graph):
    return [f"{m} imports {n}" for m in graph for n in graph[m] if LEVEL[n] < LEVEL[m]]


def test_the_top_level_is_the_design_cards_files_and_the_rest_is_in_folders():
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top == TOP, top ^ TOP
    for d in FOLDERS:  # each folder says what it holds
        assert ast.get_docstring(ast.parse(open(os.path.join(ROOT, d, "__init__.py")).read())), d


def test_no_import_cycles_function_level_imports_included():
    graph = {m: imports(m) - {m} for m in modules()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_hidden_cycle():
    # the shape the old layout had: sample -> configurator -> shapes -> sample (inside a function)
    graph = {"sample": {"configurator"}, "configurator": {"shapes"}, "shapes": {"sample", "torch"}, "torch": set()}
    assert find_cycle(graph) == ["sample", "configurator", "shapes", "sample"]
    graph["shapes"] = {"torch"}
    assert find_cycle(graph) is None


def test_every_module_has_a_layer_and_imports_only_downwards():
    assert set(modules()) == set(LEVEL), "place each new file in a layer (here and in the README)"
    graph = {m: imports(m) for m in modules()}
    assert not upward(graph), upward(graph)


def test_an_upward_import_is_found_in_every_spelling():
    # plumbing importing a trainer, a model provider or the library, however it is written
    for source in ("from plumbing import configurator\nimport train_ddpo\n", "def f():\n    from train_prdp import main\n",
                   "import shapes.build\n", "from shapes import models as m\n", "from experiments.compare_stats import x\n"):
        assert upward({"plumbing.runs": imports_in(source, set(LEVEL))}), source
    assert not upward({"plumbing.runs": imports_in("from plumbing import configurator\nimport os\n", set(LEVEL))})


def test_configurator_is_the_command_line_and_nothing_else():
    tree = ast.parse(open(path("plumbing.configurator")).read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names), names  # no torch, no matplotlib: no plots, no processes
    text = open(path("plumbing.configurator")).read()
    for other in ("prompts.txt", "log.jsonl", "init_process_group", "savefig"):
        assert other not in text


def test_every_file_opens_with_a_docstring_and_the_readme_map_names_every_file():
    for m in modules():
        assert ast.get_docstring(ast.parse(open(path(m)).read())), m
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:\w+/)?\w+)\.py`", table))
    assert named == {m.replace(".", "/") for m in modules()}, named ^ {m.replace(".", "/") for m in modules()}


def test_the_house_stays_readable():
    # a trainer reads top to bottom in one sitting; the README fits on a few screens
    for trainer in ("train_ddpo", "train_alignprop", "train_prdp"):
        source = open(path(trainer)).read()
        main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
        assert len(source.splitlines()) <= 330 and main.end_lineno - main.lineno < 150, trainer
    assert len(open(path("experiments.bench")).read().splitlines()) <= 450
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250
