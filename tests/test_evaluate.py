"""experiments/evaluate.py: a finished run's LoRA (or the base model) scored on a prompt set, per category. Its
rewards against diffusers' own pipeline sampling the same noise, the paired difference against a
baseline evaluation, DrawBench's categories on the tiny SD-shaped model (bad input: test_bad_input.py)."""
import json
import os

import pytest
import torch

import lora
import pipelines
import prompt_sets
import rewards
from experiments import compare
from conftest import run_trainer

FAST = ["--num_seeds=2", "--num_steps=3", "--grid_seeds=2"]


@pytest.fixture(scope="module")
def shapes_run(micro_world, tmp_path_factory):
    """A run folder as the trainers leave it (config.json, lora/), with a LoRA that changes the model,
    and the shapes world's held-out captions as experiments/compare.py holds them out (every 7th caption)."""
    run = tmp_path_factory.mktemp("run")
    pipe = pipelines.load_pipeline(micro_world)
    torch.manual_seed(0)
    lora.inject(pipe.unet)
    with torch.no_grad():
        for m in lora.layers(pipe.unet).values():
            m.lora_B.normal_(std=0.3)
    lora.save(pipe.unet, str(run / "lora"))
    (run / "config.json").write_text(json.dumps(dict(model=micro_world, revision="", variant="", reward="shapes_alignment",
                                                     reward_options=f"path={micro_world}")))
    held = prompt_sets.load_prompts("shapes")[::compare.HOLDOUT_STRIDE]
    (run / "heldout.txt").write_text("".join(p + "\n" for p in held))
    return str(run), str(run / "heldout.txt"), held


def reference_rewards(folder, weights, prompts, seeds, reward_fn, steps=3, guidance=5.0):
    """What diffusers' own StableDiffusionPipeline draws from seed s's noise (DDIM, eta 0), with the
    LoRA loaded, scored by the reward: [P, S]."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if weights:
        pipe.load_lora_weights(os.path.dirname(weights))
    unet = pipe.unet.config
    noise = torch.stack([torch.randn(unet.in_channels, unet.sample_size, unet.sample_size,
                                     generator=torch.Generator().manual_seed(s)) for s in seeds])
    out = []
    for p in prompts:
        clean = p.replace("(", "").replace(")", "")
        with torch.no_grad():
            images = pipe([clean] * len(seeds), latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                          eta=0.0, output_type="pt").images
            out.append(reward_fn(images, [clean] * len(seeds)))
    return torch.stack(out)


def test_a_runs_lora_on_the_held_out_captions_scores_what_diffusers_draws(shapes_run, micro_world, tmp_path):
    run, heldout, held = shapes_run
    run_trainer("experiments.evaluate", f"--lora={run}", f"--prompts={heldout}", *FAST)
    out = os.path.join(run, "eval-heldout-shapes_alignment")  # the run's model and reward, in the run's folder
    with open(os.path.join(out, "table.json")) as f:
        table = json.load(f)
    assert table["config"]["model"] == micro_world and table["config"]["reward"] == "shapes_alignment"
    got = torch.tensor([p["rewards"] for p in table["per_prompt"]])
    assert [p["prompt"] for p in table["per_prompt"]] == held and got.shape == (len(held), 2)
    reward_fn = rewards.load("shapes_alignment", path=micro_world)
    want = reference_rewards(micro_world, os.path.join(run, "lora", lora.FILE_NAME), held, [0, 1], reward_fn)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    base = reference_rewards(micro_world, None, held, [0, 1], reward_fn)
    assert not torch.allclose(got, base, atol=1e-2)  # the LoRA was applied
    # the categories: the held-out captions' hard/common and background; each row the mean of its prompts
    cats = prompt_sets.categories(held)
    assert list(table["categories"]) == list(dict.fromkeys(cats)) + ["all"]
    for cat, row in table["categories"].items():
        rows = got[[i for i, c in enumerate(cats) if cat in (c, "all")]]
        assert row["prompts"] == len(rows) and row["images"] == rows.numel()
        assert row["mean"] == pytest.approx(rows.mean().item(), abs=1e-5) and row["low"] <= row["mean"] <= row["high"]
    md = open(os.path.join(out, "table.md")).read()
    assert all(f"| {c} | " in md for c in set(cats)) and "| **all** |" in md
    assert os.path.exists(os.path.join(out, "grid.png")) and not [f for f in os.listdir(out) if ".tmp" in f]


def test_paired_difference_against_the_base_model(shapes_run, micro_world, tmp_path):
    run, heldout, held = shapes_run
    common = [f"--prompts={heldout}", "--reward=shapes_alignment", f"--reward_options=path={micro_world}", *FAST]
    run_trainer("experiments.evaluate", f"--model={micro_world}", *common, f"--out={tmp_path / 'base'}")
    base = json.load(open(tmp_path / "base" / "table.json"))
    run_trainer("experiments.evaluate", f"--lora={run}", *common, f"--baseline={tmp_path / 'base' / 'table.json'}",
                f"--out={tmp_path / 'lora'}")
    tuned = json.load(open(tmp_path / "lora" / "table.json"))
    for cat, row in tuned["categories"].items():
        assert row["vs_baseline"]["mean"] == pytest.approx(row["mean"] - base["categories"][cat]["mean"], abs=1e-5)
    run_trainer("experiments.evaluate", f"--model={micro_world}", *common, f"--baseline={tmp_path / 'base' / 'table.json'}",
                f"--out={tmp_path / 'same'}")
    same = json.load(open(tmp_path / "same" / "table.json"))["categories"]["all"]["vs_baseline"]
    assert same["mean"] == 0 and same["verdict"] == "no difference"  # the same images again
    with pytest.raises(SystemExit, match="evaluated with num_seeds=2, this one with 3"):
        run_trainer("experiments.evaluate", f"--lora={run}", *common, "--num_seeds=3",
                    f"--baseline={tmp_path / 'base' / 'table.json'}", f"--out={tmp_path / 'bad'}")
    assert not (tmp_path / "bad").exists()


def test_drawbench_on_the_tiny_sd_model_with_the_aesthetic_reward(tiny_pipeline_dir, tiny_open_clip, tmp_path):
    name, clip, mlp = tiny_open_clip
    run_trainer("experiments.evaluate", f"--model={tiny_pipeline_dir}", "--prompts=drawbench", "--per_category=1",
                "--reward=aesthetic", f"--reward_options=clip_model={name},clip_pretrained={clip},mlp_path={mlp}",
                "--num_seeds=1", "--num_steps=2", "--grid_prompts=1", f"--out={tmp_path}")
    table = json.load(open(tmp_path / "table.json"))
    assert len(table["categories"]) == 12 and table["categories"]["all"]["prompts"] == 11
    assert all(row["prompts"] == 1 for c, row in table["categories"].items() if c != "all")
    drawbench = prompt_sets.drawbench_categories()
    assert all(drawbench[p["prompt"]] == p["category"] for p in table["per_prompt"])
    assert all(torch.isfinite(torch.tensor(p["rewards"])).all() for p in table["per_prompt"])
