"""--revision and --variant: which weights a script loads. Variants are weight files of a local
folder (*.fp16.safetensors); revisions are read from a hub cache built here (two snapshots of a tiny
pipeline, as `hf download` leaves them), offline."""
import json
import os
import runpy
import sys

import pytest
import torch

import pipelines
import rewards
import sample
from conftest import TINY, read_log, run_trainer, tiny_pipeline

COMMON = ["--epochs=1"]


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    """Two folders: plain weights (seed 0) with an fp16 variant beside them (seed 1), and one with the
    fp16 variant's files only, as some hub repos hold them."""
    both, only = tmp_path_factory.mktemp("both"), tmp_path_factory.mktemp("variant_only")
    tiny_pipeline(seed=0).save_pretrained(both)
    tiny_pipeline(seed=1).save_pretrained(both, variant="fp16")
    tiny_pipeline(seed=1).save_pretrained(only, variant="fp16")
    assert os.listdir(only / "unet") and not (only / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return str(both), str(only)


def test_variant_picks_the_weight_files(variant_dirs):
    both, _ = variant_dirs
    assert same_weights(pipelines.load_pipeline(both).unet, tiny_pipeline(seed=0).unet)
    fp16 = pipelines.load_pipeline(both, variant="fp16")
    assert same_weights(fp16.unet, tiny_pipeline(seed=1).unet)
    assert same_weights(fp16.text_encoder, tiny_pipeline(seed=1).text_encoder)
    with pytest.raises(ValueError) as e:
        pipelines.load_pipeline(both, variant="bf16")
    assert "variant 'bf16'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("script", sorted(TINY))
def test_every_trainer_passes_variant_on(variant_dirs, prompt_file, tmp_path, script):
    _, only = variant_dirs
    argv = [f"--model={only}", f"--prompts={prompt_file}", *TINY[script], *COMMON]
    with pytest.raises(SystemExit) as e:  # without it the folder has no weights to load
        run_trainer(script, *argv, f"--out={tmp_path / 'plain'}")
    assert "--variant" in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "plain").exists()
    run_trainer(script, *argv, "--variant=fp16", f"--out={tmp_path / 'fp16'}")
    assert (tmp_path / "fp16" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_sample_passes_variant_on(variant_dirs, tmp_path, monkeypatch):
    _, only = variant_dirs
    argv = ["sample.py", f"--model={only}", "--prompt=a red circle", "--num_seeds=1", "--steps=2"]
    monkeypatch.setattr(sys, "argv", argv + [f"--out={tmp_path / 'a.png'}"])
    with pytest.raises(SystemExit, match="--variant"):
        runpy.run_path(sample.__file__, run_name="__main__")
    monkeypatch.setattr(sys, "argv", argv + ["--variant=fp16", f"--out={tmp_path / 'b.png'}"])
    runpy.run_path(sample.__file__, run_name="__main__")
    assert (tmp_path / "b.png").exists() and not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------------------ revisions of a hub id

MAIN, V1 = "a" * 40, "b" * 40  # commit hashes of the two snapshots


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding hub id org/tiny-sd at two commits: main (seed 0) and the
    tag v1 (seed 1); and org/tiny-pickscore likewise. Returns a function (repo, commit) -> folder."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def snapshot(repo, commit, ref=None):
        root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        if ref:
            (root / "refs" / ref).write_text(commit)
        return root / "snapshots" / commit
    for commit, ref, seed in ((MAIN, "main", 0), (V1, "v1", 1)):
        tiny_pipeline(seed=seed).save_pretrained(snapshot("org/tiny-sd", commit, ref))
    return snapshot


def test_revision_picks_the_snapshot(hub_cache):
    assert same_weights(pipelines.load_pipeline("org/tiny-sd").unet, tiny_pipeline(seed=0).unet)
    for rev in ("v1", V1):  # a tag or the commit itself
        assert same_weights(pipelines.load_pipeline("org/tiny-sd", revision=rev).unet, tiny_pipeline(seed=1).unet)
    with pytest.raises(ValueError) as e:  # not cached, and offline: at once, in one line
        pipelines.check_model("org/tiny-sd", revision="v2")
    assert "at revision 'v2'" in str(e.value) and "--revision v2" in str(e.value) and "\n" not in str(e.value)


def test_revision_of_a_local_folder_or_the_shapes_world_is_refused(tiny_pipeline_dir):
    for model in (tiny_pipeline_dir, "shapes"):
        with pytest.raises(ValueError, match="--revision=v1 pins a hub model") as e:
            pipelines.check_model(model, revision="v1")
        assert "\n" not in str(e.value)
    assert pipelines.check_model(tiny_pipeline_dir) == tiny_pipeline_dir


def test_trainer_and_sample_pass_revision_on(hub_cache, prompt_file, tmp_path, monkeypatch):
    from PIL import Image
    grids = {}
    for rev in ("", "v1"):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--model=org/tiny-sd", f"--revision={rev}", "--prompt=a red circle",
                                          "--num_seeds=1", "--steps=2", f"--out={tmp_path / (rev or 'main')}.png"])
        runpy.run_path(sample.__file__, run_name="__main__")
        grids[rev] = Image.open(tmp_path / f"{rev or 'main'}.png").tobytes()
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--model={hub_cache('org/tiny-sd', V1)}", "--prompt=a red circle",
                                      "--num_seeds=1", "--steps=2", f"--out={tmp_path / 'folder.png'}"])
    runpy.run_path(sample.__file__, run_name="__main__")
    assert grids["v1"] == Image.open(tmp_path / "folder.png").tobytes() != grids[""]
    mod = run_trainer("train_ddpo", "--model=org/tiny-sd", "--revision=v1", f"--prompts={prompt_file}",
                      *TINY["train_ddpo"], *COMMON, f"--out={tmp_path / 'run'}")
    assert mod.config["revision"] == "v1"  # recorded in config.json: a resume must load the same weights
    with pytest.raises(SystemExit, match="at revision 'v2'"):
        run_trainer("train_ddpo", "--model=org/tiny-sd", "--revision=v2", f"--prompts={prompt_file}",
                    *TINY["train_ddpo"], *COMMON, f"--out={tmp_path / 'run2'}")
    assert not (tmp_path / "run2").exists()


def test_pickscore_revision(hub_cache, tiny_pickscore):
    from transformers import CLIPModel
    model, proc, _, proc_dir = tiny_pickscore
    torch.manual_seed(1)
    other = CLIPModel(model.config).eval()
    model.save_pretrained(hub_cache("org/tiny-pickscore", MAIN, "main"))
    other.save_pretrained(hub_cache("org/tiny-pickscore", V1, "v1"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]

    def score(**options):
        return rewards.load("pickscore", processor=proc_dir, **options)(images, prompts)
    assert torch.allclose(score(model="org/tiny-pickscore"), score(model=model))
    assert torch.allclose(score(model="org/tiny-pickscore", revision="v1"), score(model=other))
    assert not torch.allclose(score(model=model), score(model=other))
    with pytest.raises(rewards.RewardUnavailable, match="at revision v2"):
        score(model="org/tiny-pickscore", revision="v2")


def test_a_run_made_before_these_options_resumes_and_refuses_another_revision(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    argv = [f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", *TINY["train_ddpo"], "--epochs=2", f"--out={out}"]
    run_trainer("train_ddpo", *argv, "--stop_after=1")
    config = json.loads((out / "config.json").read_text())
    del config["revision"], config["variant"]  # as a run folder made before --revision existed
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"different config \(variant: None -> 'fp16'\)"):
        run_trainer("train_ddpo", *argv, "--variant=fp16")
    run_trainer("train_ddpo", *argv)  # the same run: it resumes
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
