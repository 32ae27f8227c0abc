"""Which weights a comparison's runs were trained on, and pooling runs made elsewhere: the model's
world (a shapes world's manifest hash), the compare folder's record of it (world.json), the checks
that a folder's runs, or a --pool folder's, are of the same weights, training prompts and resolved
options, and the copying in of the pooled runs. experiments/compare.py calls them before it trains.
"""
import json
import os
import shutil

from experiments.compare_stats import read_log
from plumbing import runs
from shapes import build as shapes_build


def world_id(model):
    """Which weights `model` names, for pooling and --versus: a shapes world's manifest hash (the
    shipped world's for "shapes"; two builds of one configuration on two machines are two worlds),
    None for a hub id or a plain diffusers folder."""
    if model == "shapes":
        return shapes_build.manifest_hash(shapes_build.SHIPPED)
    return shapes_build.manifest_hash(model) if os.path.isdir(model) else None


def recorded_world(folder):
    """The weights a compare folder's runs were trained on: its world.json (written by its first
    invocation) as a dict, None if it has none."""
    path = os.path.join(folder, "world.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_world(folder, model):
    """A compare folder's runs are all of one model's weights: a shapes world rebuilt or changed since
    would otherwise mix its runs with the old world's in one table. Refused in one line before anything runs."""
    if (before := recorded_world(folder)) and before.get("world") != world_id(model):
        raise SystemExit(f"error: {folder} holds runs of other weights (world {before.get('world')}, --model={model} is "
                         f"now {world_id(model)}); their numbers cannot be pooled with new runs: pass --out=<new folder>")


def same_prompts(path, prompt_list):
    """False if the prompt file at `path` exists and holds other prompts than `prompt_list`."""
    if not os.path.exists(path):
        return True
    with open(path) as f:
        return f.read() == "".join(p + "\n" for p in prompt_list)


def finished(run):
    """A run has every epoch in its log.jsonl and its final LoRA weights written (compare skips it)."""
    return (len(read_log(run["dir"])) >= run["config"]["epochs"]
            and os.path.exists(os.path.join(run["dir"], "lora", "pytorch_lora_weights.safetensors")))


POOL_IGNORES = set(runs.MAY_CHANGE) | {"out", "prompts"}  # where a run's folder is; its prompts' contents are checked apart


def pooled_runs(pool, run_list, train_list, model):
    """[(run, folder in a --pool folder)] for each of this comparison's unfinished runs that a folder of
    `pool` (comma-separated) has finished, after checking that folder measured the same thing: the same
    world (its world.json), the same training prompts, and for each run the same resolved options.
    Refused in one line otherwise."""
    found = []
    for other in [p.strip() for p in pool.split(",") if p.strip()]:
        where, theirs = f"--pool={other}", recorded_world(other)
        if theirs is None:
            raise SystemExit(f"error: {where} holds no world.json (not a compare folder, or one from before it was "
                             "recorded); pool only folders written by this command")
        if theirs.get("world") != world_id(model):
            raise SystemExit(f"error: {where} was trained on other weights (world {theirs.get('world')}, here "
                             f"{world_id(model)}); runs of two worlds cannot be pooled")
        prompts_file = os.path.join(other, "train_prompts.txt")
        if not same_prompts(prompts_file, train_list):
            raise SystemExit(f"error: {where} trained on other prompts ({prompts_file}); its runs cannot be pooled")
        for r in run_list:
            d = os.path.join(other, r["name"])
            if finished(r) or any(r is q for q, _ in found) or not os.path.exists(os.path.join(d, "config.json")):
                continue
            with open(os.path.join(d, "config.json")) as f:
                config = json.load(f)
            if diff := runs.differing(config, r["config"], POOL_IGNORES):
                k = diff[0]
                raise SystemExit(f"error: {where}: run {r['name']} was run with other options ({k}: {config.get(k)!r}, "
                                 f"here {r['config'].get(k)!r}); pass the same --args, or leave that folder out")
            if finished(dict(r, dir=d)):
                found.append((r, d))
    return found


def copy_pooled(pooled):
    """Copy the pooled runs into this comparison's folder, their config.json rewritten with this
    folder's paths, so the folder holds every run its table counts; not their .pt files (the resume
    checkpoint, and the held-out evaluations, which are redone here like every run's)."""
    for r, d in pooled:
        tmp = r["dir"] + ".pooling"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns("*.pt"))
        runs.write_text(os.path.join(tmp, "config.json"), json.dumps(r["config"], indent=2) + "\n")
        shutil.rmtree(r["dir"], ignore_errors=True)  # an unfinished local run of the same seed gives way
        os.replace(tmp, r["dir"])
        print(f"{r['name']}: pooled from {d}", flush=True)
