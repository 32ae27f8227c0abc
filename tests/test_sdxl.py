"""SDXL in every script, on a tiny random SDXL-shaped pipeline (tests/conftest.py): loading, the
conditioning record against diffusers' own StableDiffusionXLPipeline (encode_prompt, the empty
prompt, the time ids, the whole DDIM rollout), DiffExp's prompt weighting on both text encoders, the
LoRA file in diffusers, and each trainer, sample.py, experiments/compare.py and experiments/bench.py with --model=<the folder>."""
import json
import runpy
import sys

import pytest
import torch

import lora
import pipelines
import sample
import sampling
from conftest import lora_weights, read_log, run_trainer, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    """Loaded once for the tests that only read it (loading takes a second)."""
    return pipelines.load_pipeline(tiny_sdxl_dir)


PROMPTS = ["a red circle", "a dolphin riding a bike"]


# --------------------------------------------------------------------------------------------
# loading

def test_load_pipeline_builds_an_sdxl_pipeline_with_ddim(pipe):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    # the DDIM swap keeps SDXL's schedule: scaled-linear betas, "leading" spacing, no x0 clipping
    assert (pipe.scheduler.config.beta_schedule, pipe.scheduler.config.timestep_spacing) == ("scaled_linear", "leading")
    assert not pipe.scheduler.config.clip_sample and not pipe.scheduler.config.set_alpha_to_one
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert not any(p.requires_grad for p in part.parameters())
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt


def test_fp16_loading_keeps_the_vae_in_fp32(tiny_sdxl_dir):
    half = pipelines.load_pipeline(tiny_sdxl_dir, precision="fp16")
    assert half.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16 (its pipeline's force_upcast)
    assert half.text_encoder.dtype == half.text_encoder_2.dtype == half.unet.dtype == torch.float16
    bf16 = pipelines.load_pipeline(tiny_sdxl_dir, precision="bf16")  # bf16 has fp32's range: all of it bf16
    assert bf16.vae.dtype == bf16.text_encoder_2.dtype == bf16.unet.dtype == torch.bfloat16


def test_offline_sdxl_hub_id_fails_with_one_line():
    with pytest.raises(ValueError) as e:
        pipelines.load_pipeline(pipelines.SDXL_HUB_MODEL)
    assert pipelines.SDXL_HUB_MODEL in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# the conditioning record against the pipeline's own

def test_encode_prompts_is_the_pipelines_encode_prompt(pipe):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    cond = sampling.encode_prompts(pipe, PROMPTS)
    assert set(cond) == {"embeds", "text_embeds", "time_ids"}
    assert cond["embeds"].shape == (2, 16, 16 + 24)  # both encoders' token states side by side
    torch.testing.assert_close(cond["embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    want_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["time_ids"], want_ids.repeat(2, 1))
    marked = sampling.encode_prompts(pipe, ["a (red) (circle)", "a (dolphin) (riding a bike)"])
    assert all(torch.equal(marked[k], cond[k]) for k in cond)  # the marks are stripped


@pytest.mark.parametrize("force_zeros", [True, False])
def test_the_empty_prompt_is_the_pipelines(tiny_sdxl_dir, tmp_path, force_zeros):
    folder = tiny_sdxl_dir
    if not force_zeros:
        tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False).save_pretrained(tmp_path / "m")
        folder = str(tmp_path / "m")
    pipe = pipelines.load_pipeline(folder)
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu")
    uncond = sampling.unconditional(pipe)
    torch.testing.assert_close(uncond["embeds"], negative, rtol=0, atol=0)
    torch.testing.assert_close(uncond["text_embeds"], negative_pooled, rtol=0, atol=0)
    assert (uncond["embeds"].abs().sum() == 0) == force_zeros  # zeros, or the encoding of ""
    assert torch.equal(uncond["time_ids"], sampling.encode_prompts(pipe, PROMPTS[:1])["time_ids"])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rollout_reproduces_the_sdxl_pipeline(pipe, eta):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(prompt=PROMPTS, latents=latents, num_inference_steps=6, guidance_scale=5.0, eta=eta)
    want = pipe(**run, output_type="pt", generator=torch.Generator().manual_seed(1)).images
    want_latents = pipe(**run, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    traj = sampling.rollout(pipe, sampling.encode_prompts(pipe, PROMPTS), sampling.unconditional(pipe), 5.0,
                            num_steps=6, eta=eta, latents=latents, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(traj.latents[:, -1], want_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.images, want, rtol=1e-5, atol=1e-5)
    assert traj.images.shape == (2, 3, 16, 16) and traj.uncond["embeds"].shape == (2, 16, 40)


def test_recorded_steps_recompute_the_same_log_probs_from_the_stored_record(pipe):
    """What DDPO and PRDP do: store the trajectory's record, slice it per micro-batch, replay each step."""
    prompts = ["a (red) circle", "a (blue) (square)", "a cat", "a (dolphin) riding a bike"]
    cond = sampling.encode_prompts(pipe, prompts, (torch.tensor([0, 1, -1, 0]), torch.tensor([1.2, 1.1, 1.05, 1.15])))
    pipe.scheduler.set_timesteps(5)
    scales = torch.tensor([1.0, 1.0, 5.0, 5.0, 5.0])
    trajs = [sampling.rollout(pipe, sampling.index(cond, slice(a, a + 2)), sampling.unconditional(pipe), scales,
                              num_steps=5, eta=1.0, generator=torch.Generator().manual_seed(a)) for a in (0, 2)]
    stored = {k: sampling.cat([getattr(t, k) for t in trajs]) for k in ("latents", "log_probs", "cond", "uncond")}
    assert all(torch.equal(stored["cond"][k], cond[k]) for k in cond)
    for i in (torch.tensor([3, 0]), torch.tensor([1, 2])):  # micro-batches across the two sampling calls
        for s, t in enumerate(trajs[0].timesteps):
            x = stored["latents"][i, s]
            eps = sampling.guided_eps(pipe.unet, x, t, sampling.index(stored["cond"], i),
                                      sampling.index(stored["uncond"], i), scales[s])
            _, lp = sampling.ddim_step(pipe.scheduler, eps, t, x, 1.0, prev_sample=stored["latents"][i, s + 1])
            torch.testing.assert_close(lp, stored["log_probs"][i, s], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DiffExp's prompt weighting on SDXL

def test_prompt_weighting_reweights_both_encoders_phrase_tokens_and_leaves_the_pooled_vector(tiny_sdxl_dir, tmp_path):
    tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False).save_pretrained(tmp_path / "m")
    pipe = pipelines.load_pipeline(str(tmp_path / "m"))  # so encode_prompt's negative is the encoding of ""
    prompts = ["a (dolphin) (riding a bike)", "(reddish) circle", "a cat on a mat"]
    phrase, w = torch.tensor([1, 0, -1]), torch.tensor([1.2, 1.1, 1.15])
    got = sampling.encode_prompts(pipe, prompts, (phrase, w))
    clean = ["a dolphin riding a bike", "reddish circle", "a cat on a mat"]
    z, z_empty, pooled, _ = pipe.encode_prompt(clean, device="cpu", negative_prompt=[""] * 3)
    n = lambda text: len(pipe.tokenizer(text, add_special_tokens=False).input_ids)  # BPE pieces of a text
    spans = [(1 + n("a dolphin"), n("riding a bike")), (1, n("reddish")), (1, n("a cat on a mat"))]
    for b, (start, k) in enumerate(spans):
        want = z[b].clone()  # both encoders' features (16 + 24) of the phrase's tokens, z_empty + w (z - z_empty)
        phrase_z, phrase_empty = z[b, start:start + k], z_empty[b, start:start + k]
        want[start:start + k] = phrase_empty + w[b] * (phrase_z - phrase_empty)
        torch.testing.assert_close(got["embeds"][b], want)
        assert not torch.allclose(got["embeds"][b, :, :16], z[b, :, :16])  # the first encoder's tokens
        assert not torch.allclose(got["embeds"][b, :, 16:], z[b, :, 16:])  # and the second's
    torch.testing.assert_close(got["text_embeds"], pooled, rtol=0, atol=0)  # the pooled vector: unweighted


# --------------------------------------------------------------------------------------------
# LoRA

def test_lora_targets_the_attention_projections_and_loads_in_the_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    from diffusers.models.attention_processor import Attention
    pipe = pipelines.load_pipeline(tiny_sdxl_dir)
    cond = sampling.encode_prompts(pipe, PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = lambda p: sampling.guided_eps(p.unet, x, torch.tensor([10, 700]), cond, sampling.unconditional(p), 5.0)
    with torch.no_grad():
        base = eps(pipe)
    lora.inject(pipe.unet, rank=4, alpha=2.0)
    # q, k, v, out of every self- and cross-attention, nothing else (not the added-conditioning MLP)
    n_attention = sum(isinstance(m, Attention) for m in pipe.unet.modules())
    assert n_attention == 16 and len(lora.layers(pipe.unet)) == 4 * n_attention
    assert all(".attn1." in name or ".attn2." in name for name in lora.layers(pipe.unet))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.layers(pipe.unet).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        ours = eps(pipe)
    assert (ours - base).abs().max() > 1e-2
    lora.save(pipe.unet, tmp_path / "lora")
    theirs = pipelines.load_pipeline(tiny_sdxl_dir)
    theirs.load_lora_weights(str(tmp_path / "lora"))  # diffusers' StableDiffusionXLPipeline, through peft
    with torch.no_grad():
        torch.testing.assert_close(eps(theirs), ours, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# every script with --model=<the SDXL folder>

def small(script, model, prompt_file, out, *extra):
    common = [f"--model={model}", f"--prompts={prompt_file}", "--num_steps=3", "--epochs=1", "--eval_every=100",
              "--eval_prompts=2", "--eval_seeds=1", f"--out={out}", "--explore", "--t_thres=500"]
    return {"train_ddpo": ["--reward=jpeg_incompressibility", "--sample_batch_size=4", "--samples_per_prompt=2",
                           "--num_batches=2", "--train_batch_size=4"],
            "train_alignprop": ["--reward=shapes_appeal", "--batch_size=2", "--truncation=2", "--steps_per_epoch=2"],
            "train_prdp": ["--reward=jpeg_incompressibility", "--prompts_per_epoch=2", "--images_per_prompt=2",
                           "--sample_batch_size=4", "--train_batch_size=2"]}[script] + common + list(extra)


def test_ddpo_epoch_on_sdxl_exploring_has_first_ratio_one(tiny_sdxl_dir, prompt_file, tmp_path):
    run_trainer("train_ddpo", *small("train_ddpo", tiny_sdxl_dir, prompt_file, tmp_path / "run"))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["ratio_dev"] < 1e-5  # the stored record recomputes the sampling log-probs
    assert rec["reward_queries"] == 8 and rec["grad_norm"] > 0
    assert any(v.abs().sum() > 0 for k, v in lora_weights(tmp_path / "run").items() if "lora_B" in k)


def test_prdp_epoch_on_sdxl_exploring_is_on_policy(tiny_sdxl_dir, prompt_file, tmp_path):
    run_trainer("train_prdp", *small("train_prdp", tiny_sdxl_dir, prompt_file, tmp_path / "run"))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["ratio_dev"] < 1e-6 and rec["kl_ref"] == pytest.approx(0, abs=1e-6)
    assert rec["reward_queries"] == 4 and rec["grad_norm"] > 0


@pytest.mark.parametrize("extra", [[], pytest.param(["--draft_lv=2", "--truncation=1"], marks=pytest.mark.slow)])
def test_alignprop_epoch_on_sdxl(tiny_sdxl_dir, prompt_file, tmp_path, extra):
    run_trainer("train_alignprop", *small("train_alignprop", tiny_sdxl_dir, prompt_file, tmp_path / "run", *extra))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] and rec["k"] == [2 if not extra else 1] * 2 and rec["grad_norm"] > 0
    assert rec["reward_queries"] == 2 * 2 * (2 if extra else 1)
    assert any(v.abs().sum() > 0 for k, v in lora_weights(tmp_path / "run").items() if "lora_B" in k)


def test_sample_cli_on_sdxl_with_a_lora(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    unet = tiny_sdxl_pipeline().unet
    lora.inject(unet)
    lora.save(unet, tmp_path / "lora")
    out = tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--model={tiny_sdxl_dir}", "--prompt=a (red) (circle)",
                                      "--num_seeds=2", "--steps=3", "--explore", f"--lora={tmp_path / 'lora'}",
                                      f"--out={out}"])
    runpy.run_path(sample.__file__, run_name="__main__")
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out) and out.exists()


@pytest.mark.slow
def test_compare_on_sdxl(tiny_sdxl_dir, prompt_file, tmp_path):
    from test_compare import configured
    out = tmp_path / "c"
    summary = configured(f"--model={tiny_sdxl_dir}", "--trainer=ddpo", "--reward=jpeg_incompressibility",
                         f"--prompts={prompt_file}", "--seeds=1", "--jobs=1",
                         "--heldout_seeds=2", f"--out={out}",
                         "--args=--num_steps=2 --sample_batch_size=2 --samples_per_prompt=1 --num_batches=1 "
                         "--train_batch_size=2 --epochs=1 --eval_prompts=1 --eval_seeds=1").main()
    for arm in ("baseline", "explore"):
        assert json.loads((out / f"{arm}-s0" / "config.json").read_text())["model"] == tiny_sdxl_dir
        assert summary["arms"][arm]["final_eval"]["mean"] == read_log(out / f"{arm}-s0")[-1]["eval_reward"]
    assert (out / "table.md").exists()


@pytest.mark.slow
def test_bench_on_sdxl(tiny_sdxl_dir, prompt_file):
    from test_bench import configured
    bench = configured(f"--model={tiny_sdxl_dir}", "--trainers=ddpo", "--batch_sizes=2", "--repeats=1", "--no-compiled",
                       "--num_steps=2", f"--ddpo_args=--reward=jpeg_incompressibility --prompts={prompt_file} "
                       "--num_steps=3 --sample_batch_size=2 --samples_per_prompt=2 --num_batches=2 --train_batch_size=4 "
                       "--timestep_fraction=1")  # every step trained: the counts below
    (b,), (speed,) = bench.main()
    calls = {(tuple(k["x"]), tuple(k["emb"]), k["grad"]): k["count"] for k in b["unet_calls"]}
    assert calls == {((4, 4, 8, 8), (4, 16, 40), False): 6, ((8, 4, 8, 8), (8, 16, 40), True): 3}
    assert all(k["seconds_each"] > 0 for k in b["unet_calls"]) and speed["batched"] > 0 and speed["unbatched"] > 0
