"""The layout: every module in its layer, imports only downwards or within a layer, no import cycle
(function-level imports included), one docstring per file saying what it holds, and the README's
file table naming exactly the files there are."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The layers of the README's "What is where", top to bottom; a module may import its own layer or lower.
LAYERS = {
    "scripts": ["train_ddpo", "train_alignprop", "train_prdp", "sample", "evaluate", "compare", "bench", "shapes_eval"],
    "library": ["sampling", "explore", "lora", "rewards", "prompt_sets", "gpu_memory", "compare_stats"],
    "models": ["pipelines", "shapes", "shapes_models", "shapes_world"],
    "plumbing": ["configurator", "runs", "dashboards", "distributed", "grids", "hub", "mixed_precision", "compiling"],
}
LEVEL = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


def modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(module):
    """The project modules `module` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(modules())


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
    upward = [f"{m} imports {n}" for m in modules() for n in imports(m) if LEVEL[n] < LEVEL[m]]
    assert not upward, upward


def test_configurator_is_the_command_line_and_nothing_else():
    tree = ast.parse(open(os.path.join(ROOT, "configurator.py")).read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names), names  # no torch, no matplotlib: no plots, no processes
    text = open(os.path.join(ROOT, "configurator.py")).read()
    for other in ("prompts.txt", "log.jsonl", "init_process_group", "savefig"):
        assert other not in text


def test_every_file_opens_with_a_docstring_and_the_readme_table_names_every_file():
    for m in modules():
        assert ast.get_docstring(ast.parse(open(os.path.join(ROOT, m + ".py")).read())), m
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)\.py`", table))
    assert named == set(modules()), (named ^ set(modules()))
