"""The shapes world that ships in the repository (shapes/pretrained/): whole (its manifest checked file by
file, and a damaged file refused in one line before anything is written), small, stored once, readable
by plain diffusers and transformers, and the world the README's numbers come from (the untrained
model's evaluation reward of the first command, to 2 decimals)."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import run_trainer
from shapes import build as shapes_build
from shapes import models as shapes_models
from plumbing import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = shapes_build.SHIPPED


def test_the_shipped_world_is_whole_small_and_stores_nothing_twice():
    from safetensors import safe_open
    assert shapes_build.check_shipped() == WORLD
    with open(os.path.join(WORLD, "world.json")) as f:
        manifest = json.load(f)
    sizes = sum(os.path.getsize(os.path.join(WORLD, p)) for p in manifest["files"])
    assert sizes <= 25e6, sizes
    assert manifest["config"]["micro"] is False and manifest["rare_captions"] and manifest["commit"]
    assert {"vae_psnr_db", "judge_accuracy", "aesthetic_correlation"} <= set(manifest)
    assert not os.path.exists(os.path.join(WORLD, "tokenizer", "tokenizer.json"))
    with safe_open(os.path.join(WORLD, "judge", "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("text_model.")]  # the text tower is the text encoder's


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "pretrained"
    shutil.copytree(WORLD, path)
    return path


def lfs_pointer(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 6787336\n")


@pytest.mark.parametrize("damage, file", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "unet/diffusion_pytorch_model.safetensors"),  # truncated
    (lfs_pointer, "text_encoder/model.safetensors"),  # a Git LFS pointer instead of the weights
    (lambda p: p.unlink(), "vae/config.json"),  # a partial checkout
    (lambda p: p.write_text(p.read_text().replace("0", "1", 1)), "scheduler/scheduler_config.json"),  # edited
])
def test_a_damaged_file_stops_the_first_command_in_one_line_naming_it(damage, file, copy, tmp_path, monkeypatch):
    target = tmp_path / "pretrained"
    shutil.copytree(copy, target)
    damage(target / file)
    with pytest.raises(ValueError) as e:
        shapes_build.check_shipped(str(target))
    assert file in str(e.value) and "\n" not in str(e.value) and "git checkout" in str(e.value)
    monkeypatch.setattr(shapes_build, "SHIPPED", str(target))  # --model=shapes is this damaged world now
    with pytest.raises(SystemExit) as e:
        run_trainer("train_ddpo", f"--out={tmp_path / 'run'}", "--epochs=1")
    assert str(e.value).startswith("error: ") and file in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_file_the_manifest_does_not_list_is_refused(copy, tmp_path):
    target = tmp_path / "pretrained"
    shutil.copytree(copy, target)
    (target / "unet" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="does not list: .*unet/extra.bin"):
        shapes_build.check_shipped(str(target))


def test_it_loads_with_plain_diffusers_and_transformers():
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    pipe = StableDiffusionPipeline.from_pretrained(WORLD)  # no project code
    assert len(pipe.tokenizer) == 49408
    text = "a (red) circle on a dark background".replace("(", "").replace(")", "")
    assert pipe.tokenizer(text).input_ids == shapes_models.clip_tokenizer()(text).input_ids
    ours = load_file(os.path.join(WORLD, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(p, ours[k]) for k, p in pipe.unet.state_dict().items())
    # the judge: its own weights, and the text tower put back from the text encoder's file
    judge = shapes_models.load_judge(WORLD)
    tower = judge.text_model.state_dict()
    text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert tower.keys() == text.keys() and all(torch.equal(v, text[k]) for k, v in tower.items())
    rng = torch.get_rng_state()
    shapes_models.load_judge(WORLD)
    assert torch.equal(rng, torch.get_rng_state())  # loading it leaves the caller's random stream alone


@pytest.mark.slow
def test_the_untrained_models_evaluation_is_the_readmes_before_training_number():
    """What a newcomer's first command prints first, reproduced: the evaluation of the untrained model
    with train_ddpo.py's defaults, as the run computes it (plumbing/lifecycle.py)."""
    import pipelines
    import prompt_sets
    import rewards
    from plumbing import evaluation
    t = configurator.fresh("train_ddpo")  # its defaults
    readme = open(os.path.join(ROOT, "README.md")).read()
    (number,) = re.findall(r"from \*\*(\d+\.\d+)\*\* before\s+training", readme)
    pipe = pipelines.load_pipeline("shapes")
    eval_list = prompt_sets.spread_subset(prompt_sets.load_prompts(t.prompts), t.eval_prompts)
    before = evaluation.evaluate(pipe, rewards.load(t.reward), eval_list, t.guidance, t.num_steps, t.eta, t.eval_seeds,
                                 batch_size=t.eval_batch_size)
    assert f"{before:.2f}" == number, (before, number)
