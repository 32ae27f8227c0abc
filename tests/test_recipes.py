"""The GPU recipes (docs/gpu.md, docs/sd3.md) for Stable Diffusion 1.5, SDXL and SD 3.5, and the evaluation
commands, run on a CPU.

Every command in the GPU page's SD 1.5 recipe block and its evaluation block, and the aesthetic SDXL
recipe of each trainer, runs here as written, except that the model becomes a tiny random SD-shaped
(or SDXL-shaped) folder, the reward's weights become tiny random ones, and the run is cut to one
epoch (AlignProp: one update; PRDP: two updates; evaluation: one seed of one prompt per category).
A misspelt or mistyped flag, batch sizes that do not divide, a truncation the step count does not
allow, or a reward that cannot train with that trainer fails here, before anyone rents a GPU for it."""
import json
import os
import re
import shlex

import pytest

from conftest import read_log, run_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def readme_recipes(marker, page="gpu.md"):
    """(module, {flag: value}) for each command between the docs `page`'s `marker` comments
    (`python train_ddpo.py` -> train_ddpo, `python -m experiments.evaluate` -> experiments.evaluate)."""
    with open(os.path.join(ROOT, "docs", page)) as f:
        text = f.read()
    block = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", text, re.S).group(1)
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines()
                if c.strip().startswith(("torchrun", "python"))]
    recipes = []
    for c in commands:
        words = shlex.split(c)
        script = words[words.index("-m") + 1] if "-m" in words else next(w for w in words if w.endswith(".py"))
        flags = words[words.index(script) + 1:]
        assert all(f.startswith("--") for f in flags), c
        recipes.append((script.removesuffix(".py"), dict(f[2:].split("=", 1) if "=" in f else (f[2:], "true") for f in flags)))
    return recipes


SD15_RECIPES, SDXL_RECIPES = readme_recipes("gpu-recipes"), readme_recipes("sdxl-recipes")
EVALS = readme_recipes("gpu-eval")
SD3_RECIPES = readme_recipes("sd3-recipes", "sd3.md")
SD3 = "stabilityai/stable-diffusion-3.5-medium"
MICRO_BATCHES = {"train_batch_size", "grad_accum", "batch_size"}  # what memory asks SDXL to change
# The recipes that run below: each trainer's aesthetic recipe on SD 1.5 and on SDXL, and AlignProp's
# PickScore one (its gradient goes through the reward). The other PickScore twins differ from their
# aesthetic recipe only in --reward and --prompts (checked below), and DDPO and PRDP use a reward as a
# score alone: running them again would test the same code twice (the reward itself: test_rewards.py).
RUN = [(s, f) for s, f in SD15_RECIPES if f["reward"] == "aesthetic" or s == "train_alignprop"]
RUN += [(s, f) for s, f in SDXL_RECIPES if f["reward"] == "aesthetic"]


def same(value, text):
    """Does a config value equal the flag's text ("3e-4" == 0.0003, "true" == True)?"""
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value).lower() == text.lower()


def test_the_readme_has_the_papers_four_settings():
    """DDPO, AlignProp and PRDP, each with aesthetic on the 45 animals and PickScore on the 135
    animal-activity prompts, on SD 1.5 and on SDXL, with DiffExp on."""
    for recipes, model in ((SD15_RECIPES, SD15), (SDXL_RECIPES, SDXL)):
        settings = {(s, f.get("reward"), f.get("prompts")) for s, f in recipes}
        for script in ("train_ddpo", "train_alignprop", "train_prdp"):
            assert (script, "aesthetic", "animals") in settings
            assert (script, "pickscore", "animal_activities") in settings
        assert all(f["model"] == model and f.get("explore") == "true" for _, f in recipes)


def test_sdxl_recipes_differ_from_sd15s_only_in_the_model_and_the_micro_batches():
    """No other change to the command line than --model, and the batch sizes memory asks for."""
    for (s1, f1), (s2, f2) in zip(SD15_RECIPES, SDXL_RECIPES, strict=True):
        assert s1 == s2 and f1.keys() == f2.keys()
        assert {k for k in f1 if f1[k] != f2[k]} <= MICRO_BATCHES | {"model"}, (s1, f1, f2)
    for script in ("train_ddpo", "train_alignprop", "train_prdp"):  # what RUN leaves out is covered
        (a1, p1), (a2, p2) = [[f for s, f in recipes if s == script] for recipes in (SD15_RECIPES, SDXL_RECIPES)]
        assert {k for k in a1 if a1[k] != p1[k]} == {k for k in a2 if a2[k] != p2[k]} == {"reward", "prompts"}


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", RUN,
                         ids=[f"{s}-{f.get('reward')}-{'sdxl' if f['model'] == SDXL else 'sd15'}" for s, f in RUN])
def test_recipe_runs_on_a_tiny_sd_folder(script, flags, tiny_pipeline_dir, tiny_sdxl_dir, tiny_open_clip, tiny_pickscore,
                                         tmp_path):
    name, ckpt, mlp = tiny_open_clip
    tiny_weights = {"aesthetic": f"clip_model={name},clip_pretrained={ckpt},mlp_path={mlp}",
                    "pickscore": f"model={tiny_pickscore[2]},processor={tiny_pickscore[3]}"}
    swapped = dict(model={SD15: tiny_pipeline_dir, SDXL: tiny_sdxl_dir}[flags["model"]], reward_options=tiny_weights[flags["reward"]], out=str(tmp_path / "run"),
                   epochs="1", eval_prompts="2", eval_seeds="1")
    # One epoch, and in it the fewest repeats that still take every path of the recipe: the same
    # sampling and training micro-batches, but one optimizer step's worth of them
    if script == "train_ddpo":  # one update: the samples of train_batch_size x grad_accum
        swapped["num_batches"] = str(int(flags["train_batch_size"]) * int(flags["grad_accum"])
                                     // int(flags["sample_batch_size"]))
    if script == "train_alignprop":  # one update of two accumulated micro-batches
        swapped.update(steps_per_epoch="1", grad_accum="2")
    if script == "train_prdp":  # one prompt's group; 2 of the 10 updates: the second replays every step
        # and clips; train_batch_size only sets how many trajectories share a UNet call (PRDP asks
        # nothing of it): all of them in one call makes fewer calls
        swapped.update(prompts_per_epoch="1", updates_per_epoch="2", train_batch_size="64")
    argv = [f"--{k}={v}" for k, v in {**flags, **swapped}.items()]
    mod = run_trainer(script, *argv)
    (rec,) = read_log(tmp_path / "run")
    with open(tmp_path / "run" / "config.json") as f:
        config = json.load(f)
    for k, v in flags.items():  # every recipe flag reached the run as docs/gpu.md writes it
        if k not in swapped:
            assert same(config[k], v), (k, config[k], v)
    if script == "train_ddpo":
        assert rec["reward_queries"] == mod.sample_batch_size * mod.num_batches
        assert rec["ratio_dev"] < 1e-5 and rec["explore"]
    elif script == "train_prdp":
        assert rec["reward_queries"] == mod.prompts_per_epoch * mod.images_per_prompt
        assert rec["ratio_dev"] < 1e-5 and rec["explore"] and rec["loss"] > 0
    else:
        assert rec["reward_queries"] == mod.batch_size * mod.grad_accum
        assert all(1 <= k <= mod.num_steps for k in rec["k"])


def test_the_readme_evaluates_drawbench_and_the_unseen_animals_against_the_base_model():
    """Each set twice, the base model then a recipe's run; the run's --baseline is the base model's
    table where experiments/evaluate.py writes it, and the run folder is where that recipe's trainer writes."""
    import importlib
    from plumbing import configurator
    assert [(s, f["prompts"], "lora" in f) for s, f in EVALS] == [
        ("experiments.evaluate", "drawbench", False), ("experiments.evaluate", "drawbench", True),
        ("experiments.evaluate", "unseen_animals", False), ("experiments.evaluate", "unseen_animals", True)]
    for base, run in (EVALS[0:2], EVALS[2:4]):
        ev = importlib.reload(importlib.import_module("experiments.evaluate"))
        ev.config = configurator.configure(vars(ev), [f"--{k}={v}" for k, v in base[1].items()])
        assert run[1]["baseline"] == os.path.join(ev.resolve()["out"], "table.json")
        trained = [f for s, f in SD15_RECIPES if s == "train_ddpo" and f["reward"] == run[1]["reward"]]
        assert run[1]["lora"] == f"out/ddpo-{run[1]['reward']}-explore-s0" and trained
        assert {k: v for k, v in base[1].items() if k not in ("model", "baseline")} == \
               {k: v for k, v in run[1].items() if k not in ("lora", "baseline")}  # the same settings


@pytest.mark.slow
def test_evaluation_commands_run_on_a_tiny_sd_folder(tiny_pipeline_dir, tiny_open_clip, tiny_pickscore, tmp_path):
    import lora
    import pipelines
    name, ckpt, mlp = tiny_open_clip
    tiny_weights = {"aesthetic": f"clip_model={name},clip_pretrained={ckpt},mlp_path={mlp}",
                    "pickscore": f"model={tiny_pickscore[2]},processor={tiny_pickscore[3]}"}
    pipe = pipelines.load_pipeline(tiny_pipeline_dir)
    lora.inject(pipe.unet)
    outs = {}
    for i, (script, flags) in enumerate(EVALS):  # in order: each base evaluation before the run's
        swapped = dict(reward_options=tiny_weights[flags["reward"]], per_category="1", num_seeds="1", out=str(tmp_path / str(i)))
        if "model" in flags:
            swapped["model"] = tiny_pipeline_dir
        if "lora" in flags:  # a finished run's folder, as the trainer leaves it
            run = tmp_path / f"run{i}"
            lora.save(pipe.unet, str(run / "lora"))
            (run / "config.json").write_text(json.dumps(dict(model=tiny_pipeline_dir, reward=flags["reward"])))
            swapped.update(lora=str(run), baseline=str(tmp_path / str(i - 1) / "table.json"))
        run_trainer(script, *[f"--{k}={v}" for k, v in {**flags, **swapped}.items()])
        with open(tmp_path / str(i) / "table.json") as f:
            table = json.load(f)
        assert len(table["categories"]) == (12 if flags["prompts"] == "drawbench" else 2)
        assert ("vs_baseline" in table["categories"]["all"]) == ("lora" in flags)
        assert table["config"]["num_steps"] == int(flags["num_steps"])


def test_the_sd3_page_has_a_recipe_per_trainer_with_flow_grpos_sampling():
    assert [s for s, _ in SD3_RECIPES] == ["train_ddpo", "train_alignprop", "train_prdp"]
    for script, f in SD3_RECIPES:
        assert f["model"] == SD3 and f["explore"] == "true" and f["num_steps"] == "10" and f["guidance"] == "4.5"
        assert f.get("eta", "0.7") == "0.7"  # Flow-GRPO's noise level; AlignProp's chain is the deterministic one
    assert dict(SD3_RECIPES)["train_ddpo"]["kl_beta"] == "0.01"


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", SD3_RECIPES, ids=[s for s, _ in SD3_RECIPES])
def test_sd3_recipe_runs_on_a_tiny_sd3_folder(script, flags, tiny_sd3_dir, tiny_pickscore, tmp_path):
    """As test_recipe_runs_on_a_tiny_sd_folder: each SD 3.5 recipe as written, one update, on the tiny
    SD3 folder (with T5) and tiny PickScore weights."""
    swapped = dict(model=tiny_sd3_dir, reward_options=f"model={tiny_pickscore[2]},processor={tiny_pickscore[3]}",
                   out=str(tmp_path / "run"), epochs="1", eval_prompts="2", eval_seeds="1")
    if script == "train_ddpo":
        swapped["num_batches"] = str(int(flags["train_batch_size"]) * int(flags["grad_accum"])
                                     // int(flags["sample_batch_size"]))
    if script == "train_alignprop":
        swapped.update(steps_per_epoch="1", grad_accum="2")
    if script == "train_prdp":
        swapped.update(prompts_per_epoch="1", updates_per_epoch="2", train_batch_size="64")
    mod = run_trainer(script, *[f"--{k}={v}" for k, v in {**flags, **swapped}.items()])
    (rec,) = read_log(tmp_path / "run")
    with open(tmp_path / "run" / "config.json") as f:
        config = json.load(f)
    assert all(same(config[k], v) for k, v in flags.items() if k not in swapped)
    assert rec["explore"] and rec["grad_norm"] > 0
    if script == "train_ddpo":
        assert rec["ratio_dev"] < 1e-5 and rec["kl_ref"] >= 0
    elif script == "train_prdp":
        assert rec["ratio_dev"] < 1e-5
    else:
        assert all(1 <= k <= mod.num_steps for k in rec["k"])
