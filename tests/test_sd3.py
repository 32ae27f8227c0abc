"""SD 3.5 in pipelines.py and lora.py, on tiny random SD3-shaped pipelines (conftest.tiny_sd3_pipeline):
a folder or hub id whose model_index.json names StableDiffusion3Pipeline loads as one, keeping its
flow-matching scheduler, with or without T5 (load_pipeline's `t5`, sample.py's --t5); LoRA on its
transformer (the text stream's projections too) round-trips through diffusers' own `load_lora_weights`
(peft) to identical outputs, and merges, unmerges and switches off as on a UNet."""
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
import pipelines
import sample
from conftest import tiny_sd3_pipeline
from plumbing import runs

PROMPTS = ["a red circle", "a blue square"]
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module", params=[False, True], ids=["no_t5", "t5"])
def sd3_dir(request, tmp_path_factory):
    """The tiny SD3-shaped pipeline saved as a diffusers folder (what `--model=<folder>` loads), saved
    without T5 (its model_index.json entry is [null, null]) or with it. Returns (folder, with T5)."""
    path = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_pipeline(t5=request.param).save_pretrained(path)
    return str(path), request.param


def latents(pipe, steps=3):
    """The pipeline's own sampling (diffusers' StableDiffusion3Pipeline.__call__), fixed noise, no VAE."""
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, height=16, width=16, output_type="latent",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images


def randomise(model, seed=1):
    """Random non-zero A and B in every LoRA layer: an update far from zero, different per layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [p for m in lora.layers(model).values() for p in (m.lora_A, m.lora_B)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------------------------
# loading

def test_a_folder_loads_as_sd3_with_its_flow_scheduler_and_frozen_encoders(sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    folder, with_t5 = sd3_dir
    pipe = pipelines.load_pipeline(folder)
    assert type(pipe) is StableDiffusion3Pipeline
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # kept, not swapped to DDIM
    assert pipe.scheduler.config.shift == 3.0
    assert (pipe.text_encoder_3 is not None) == (pipe.tokenizer_3 is not None) == with_t5
    parts = [getattr(pipe, n) for n in ENCODERS + ("vae",) if getattr(pipe, n) is not None]
    assert len(parts) == 3 + with_t5 and not any(p.requires_grad for part in parts for p in part.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())  # the CPU's auto precision
    # the very model that was saved: the same latents as the in-memory pipeline
    torch.testing.assert_close(latents(pipe), latents(tiny_sd3_pipeline(t5=with_t5)), rtol=0, atol=0)


def test_t5_false_leaves_t5_out(sd3_dir):
    folder, with_t5 = sd3_dir
    pipe = pipelines.load_pipeline(folder, t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    # the pipeline then conditions on zeros in place of T5's tokens, as the saved one does with T5 taken out
    ref = tiny_sd3_pipeline(t5=with_t5)
    ref.text_encoder_3 = ref.tokenizer_3 = None
    torch.testing.assert_close(latents(pipe), latents(ref), rtol=0, atol=0)
    if with_t5:  # T5's tokens did condition the samples
        assert not torch.equal(latents(pipe), latents(pipelines.load_pipeline(folder)))


def test_sample_passes_t5_on(sd3_dir, tmp_path, monkeypatch):
    """sample.py's --t5 (default on) and --no-t5: different grids where the folder has T5, the same without."""
    from PIL import Image
    folder, with_t5 = sd3_dir
    grids = []
    for flag in ("--t5", "--no-t5"):
        out = tmp_path / f"{flag}.png"
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--model={folder}", "--prompt=a red circle", "--num_seeds=1",
                                          "--steps=2", flag, f"--out={out}"])
        runpy.run_path(sample.__file__, run_name="__main__")
        grids.append(Image.open(out).tobytes())
    assert (grids[0] != grids[1]) == with_t5


def test_a_run_config_from_before_sd3_is_the_same_run_as_t5_on_and_no_kl():
    """runs.ADDED_OPTIONS: a run folder's config without `t5` counts as --t5 and without `kl_beta` as 0, either
    side, so a run started before SD 3.5 came resumes; another value is another run."""
    old, now = {"lr": 1.0}, {"lr": 1.0, "t5": True, "kl_beta": 0.0}
    assert runs.differing(old, now) == runs.differing(now, old) == []
    assert runs.differing(old, {**now, "t5": False}) == runs.differing({**now, "t5": False}, old) == ["t5"]
    assert runs.differing(old, {**now, "kl_beta": 0.01}) == ["kl_beta"]


def test_precision_bf16_gives_bf16_weights(sd3_dir):
    folder, with_t5 = sd3_dir
    pipe = pipelines.load_pipeline(folder, precision="bf16")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    for part in [getattr(pipe, n) for n in ENCODERS if getattr(pipe, n) is not None] + [pipe.vae]:
        assert {p.dtype for p in part.parameters()} <= {torch.bfloat16, torch.float32}  # T5 keeps some fp32
        assert torch.bfloat16 in {p.dtype for p in part.parameters()}


def test_variant_and_a_hub_id_at_a_revision(tmp_path, monkeypatch):
    """--variant picks an SD 3.5 folder's weight files, and a hub id cached at two commits loads at
    either one (an offline cache as `hf download` leaves it, as in test_revision_variant.py)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "hub" / "models--org--tiny-sd3"
    (root / "refs").mkdir(parents=True)
    for commit, ref, seed in (("a" * 40, "main", 0), ("b" * 40, "v1", 1)):
        (root / "refs" / ref).write_text(commit)
        tiny_sd3_pipeline(seed=seed).save_pretrained(root / "snapshots" / commit)
    tiny_sd3_pipeline(seed=1).save_pretrained(root / "snapshots" / ("a" * 40), variant="fp16")

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    base, other = tiny_sd3_pipeline(seed=0).transformer, tiny_sd3_pipeline(seed=1).transformer
    assert same(pipelines.load_pipeline("org/tiny-sd3").transformer, base)
    assert same(pipelines.load_pipeline("org/tiny-sd3", revision="v1").transformer, other)
    assert same(pipelines.load_pipeline("org/tiny-sd3", variant="fp16").transformer, other)
    with pytest.raises(ValueError) as e:
        pipelines.load_pipeline("org/tiny-sd3", variant="bf16")
    assert "variant 'bf16'" in str(e.value) and "\n" not in str(e.value)


def test_an_uncached_sd3_hub_id_offline_is_one_line_naming_the_model(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # whatever this machine holds
    assert pipelines.SD3_HUB_MODEL == "stabilityai/stable-diffusion-3.5-medium"
    for load in (pipelines.check_model, pipelines.load_pipeline):
        with pytest.raises(ValueError) as e:
            load(pipelines.SD3_HUB_MODEL)
        msg = str(e.value)
        assert "'stabilityai/stable-diffusion-3.5-medium'" in msg and "not in the Hugging Face cache" in msg
        assert "hf download stabilityai/stable-diffusion-3.5-medium" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------
# LoRA on the transformer

def test_inject_targets_both_streams_of_the_joint_attention():
    pipe = tiny_sd3_pipeline()
    base = latents(pipe)
    params = lora.inject(pipe.transformer, rank=4)
    names = list(lora.layers(pipe.transformer))
    # 2 joint blocks: the image stream's q, k, v, out and the text stream's add_q/k/v_proj and to_add_out,
    # except the last block's to_add_out (its text stream ends at the attention: context_pre_only)
    assert len(names) == 8 + 7 and len(params) == 2 * 15
    assert {n.rpartition("attn.")[2] for n in names} == set(lora.DEFAULT_TARGETS)
    assert "transformer_blocks.1.attn.to_add_out" not in names
    trainable = {id(p) for p in pipe.transformer.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    torch.testing.assert_close(latents(pipe), base, rtol=0, atol=0)  # B = 0: the base model exactly


@pytest.mark.parametrize("rank,alpha", [(4, None), (2, 8.0)])
def test_diffusers_load_lora_weights_reproduces_our_transformer(tmp_path, rank, alpha):
    pipe = tiny_sd3_pipeline()
    base = latents(pipe)
    lora.inject(pipe.transformer, rank=rank, alpha=alpha)
    randomise(pipe.transformer)
    ours = latents(pipe)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the samples
    lora.save(pipe.transformer, tmp_path)
    keys = load_file(tmp_path / lora.FILE_NAME)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys  # diffusers' SD3 convention
    assert "transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight" in keys
    assert len(keys) == 2 * 15 and all(k.startswith("transformer.") for k in keys)
    fresh = tiny_sd3_pipeline()  # same seed: same base weights
    fresh.load_lora_weights(str(tmp_path))  # SD3LoraLoaderMixin, through peft
    torch.testing.assert_close(latents(fresh), ours)


def test_our_load_reads_a_transformer_file_and_merge_unmerge_disabled_work(tmp_path):
    pipe = tiny_sd3_pipeline()
    base = latents(pipe)
    lora.inject(pipe.transformer, rank=4, alpha=2.0)
    randomise(pipe.transformer)
    ours = latents(pipe)
    lora.save(pipe.transformer, tmp_path / "w.safetensors")
    fresh = tiny_sd3_pipeline()
    lora.load(fresh.transformer, tmp_path / "w.safetensors")
    torch.testing.assert_close(latents(fresh), ours, rtol=0, atol=0)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    lora.merge(pipe.transformer)
    torch.testing.assert_close(latents(pipe), ours, atol=1e-5, rtol=1e-5)
    lora.unmerge(pipe.transformer)  # W back bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    with lora.disabled(pipe.transformer):  # PRDP's reference model: the pretrained transformer exactly
        torch.testing.assert_close(latents(pipe), base, rtol=0, atol=0)
    torch.testing.assert_close(latents(pipe), ours, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# the three trainers, exploring, on the tiny SD3 folder (the same checks as on SD 1.5 and SDXL)

def small(script, model, prompt_file, out, *extra):
    from test_sdxl import small as sdxl_small  # the same settings as SDXL's trainer tests
    return sdxl_small(script, model, prompt_file, out, *extra)


def test_ddpo_epoch_on_sd3_exploring_has_first_ratio_one(sd3_dir, prompt_file, tmp_path):
    from conftest import lora_weights, read_log, run_trainer
    folder, with_t5 = sd3_dir
    run_trainer("train_ddpo", *small("train_ddpo", folder, prompt_file, tmp_path / "run", "--eta=0.7",
                                     *([] if with_t5 else ["--no-t5"])))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["ratio_dev"] < 1e-5  # the stored record recomputes the flow SDE's log-probs
    assert rec["reward_queries"] == 8 and rec["grad_norm"] > 0
    weights = lora_weights(tmp_path / "run")
    assert all(k.startswith("transformer.") for k in weights)  # diffusers' SD3 convention
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_ddpo_kl_penalty_on_sd3(tiny_sd3_dir, prompt_file, tmp_path):
    from conftest import read_log, run_trainer
    run_trainer("train_ddpo", *small("train_ddpo", tiny_sd3_dir, prompt_file, tmp_path / "run", "--eta=0.7",
                                     "--kl_beta=0.04"))
    (rec,) = read_log(tmp_path / "run")
    assert rec["kl_ref"] > 0 and rec["ratio_dev"] < 1e-5  # the second update starts from a moved LoRA


def test_prdp_epoch_on_sd3_exploring_is_on_policy(sd3_dir, prompt_file, tmp_path):
    from conftest import read_log, run_trainer
    folder, with_t5 = sd3_dir
    run_trainer("train_prdp", *small("train_prdp", folder, prompt_file, tmp_path / "run", "--eta=0.7",
                                     *([] if with_t5 else ["--no-t5"])))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["ratio_dev"] < 1e-6 and rec["kl_ref"] == pytest.approx(0, abs=1e-6)
    assert rec["reward_queries"] == 4 and rec["grad_norm"] > 0


def test_alignprop_epoch_on_sd3(sd3_dir, prompt_file, tmp_path):
    from conftest import lora_weights, read_log, run_trainer
    folder, with_t5 = sd3_dir
    run_trainer("train_alignprop", *small("train_alignprop", folder, prompt_file, tmp_path / "run",
                                          *([] if with_t5 else ["--no-t5"])))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["k"] == [2, 2] and rec["grad_norm"] > 0 and rec["reward_queries"] == 4
    assert any(v.abs().sum() > 0 for k, v in lora_weights(tmp_path / "run").items() if "lora_B" in k)


def test_draft_lv_epoch_on_sd3(tiny_sd3_dir, prompt_file, tmp_path):
    # DRaFT-LV re-noises x_0 with the flow's (1 - sigma) x_0 + sigma noise (the scheduler's scale_noise)
    from conftest import lora_weights, read_log, run_trainer
    extra = ["--draft_lv=2", "--truncation=1"]
    run_trainer("train_alignprop", *small("train_alignprop", tiny_sd3_dir, prompt_file, tmp_path / "run", *extra))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["k"] == [1, 1] and rec["grad_norm"] > 0
    assert rec["reward_queries"] == 2 * 2 * 2  # steps x batch x copies
    assert any(v.abs().sum() > 0 for k, v in lora_weights(tmp_path / "run").items() if "lora_B" in k)


def test_alignprop_gradient_on_sd3_matches_finite_differences():
    """AlignProp's gradient through SD 3.5's whole deterministic (Euler) chain, with DiffExp's CFG
    schedule in the flow model's units, against central finite differences (as on SD 1.5:
    test_alignprop.py)."""
    import sampling
    import train_alignprop as ta
    from explore import cfg_schedule
    from test_alignprop import PROMPTS as WEIGHTED, brightness, check_against_finite_differences
    pipe = tiny_sd3_pipeline().to(torch.float64)
    params = lora.inject(pipe.transformer)
    pipe.transformer.to(torch.float64)
    torch.manual_seed(1)
    for p in params:  # away from B = 0, where the gradient w.r.t. A vanishes
        p.data.normal_(0, 0.3)
    uncond = sampling.unconditional(pipe)
    pipe.scheduler.set_timesteps(3)
    schedule = cfg_schedule(pipe.scheduler, w_high=4.5, w_low=1.0, t_thres=500)

    def loss():
        r, _ = ta.sample_and_score(pipe, brightness, WEIGHTED, uncond, 3, sampling.random_streams(7), batch_size=2,
                                   num_steps=3, eta=0.0, guidance=4.5, scale=schedule, explore_weights=True)
        return -r.mean()

    check_against_finite_differences(loss, params, directions=2)


def test_bad_input_on_sd3_is_refused_as_for_the_others(sd3_dir, prompt_file, tmp_path):
    from conftest import run_trainer
    folder, _ = sd3_dir
    with pytest.raises(SystemExit, match="--t_thres must be below the model's 1000 training timesteps"):
        run_trainer("train_ddpo", *small("train_ddpo", folder, prompt_file, tmp_path / "r", "--t_thres=1000"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit, match="--eta must be in"):
        run_trainer("train_prdp", *small("train_prdp", folder, prompt_file, tmp_path / "r", "--eta=0"))
