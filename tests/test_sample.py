"""sample.py against references: diffusers' DDIMScheduler.step and StableDiffusionPipeline.__call__,
torch.distributions.Normal, and direct text-encoder calls, on tiny random models."""
import runpy
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import explore
import pipelines
import sample
import sampling
from plumbing import evaluation, grids
from conftest import tiny_pipeline

SCHEDULERS = {  # SD 1.5's DDIM config, and the shapes world's kind (trailing spacing, cosine betas)
    "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1),
    "trailing": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=False,
                     timestep_spacing="trailing"),
}


def make_scheduler(kind, prediction_type, num_steps=10, **overrides):
    s = DDIMScheduler(prediction_type=prediction_type, **{**SCHEDULERS[kind], **overrides})
    s.set_timesteps(num_steps)
    return s


def reference_mean_std(s, eps, t, x, eta):
    """DDIM's mean (diffusers' step with zero noise) and std (eta * sqrt of its variance, eq. 16)."""
    mean = s.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
    return mean, eta * s._get_variance(t, prev_t).sqrt()


# --------------------------------------------------------------------------------------------
# ddim_step

@pytest.mark.parametrize("kind", ["sd", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_matches_diffusers(kind, prediction_type, eta):
    s = make_scheduler(kind, prediction_type)
    for i in [0, 4, len(s.timesteps) - 1]:  # first, middle and last step (final alpha)
        t = int(s.timesteps[i])
        g = torch.Generator().manual_seed(i)
        x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i))
        want = s.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        got, log_prob = sampling.ddim_step(s, eps, t, x, eta, generator=torch.Generator().manual_seed(100 + i))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # log-density under an independently built Normal, averaged over the non-batch dims
        mean, std = reference_mean_std(s, eps, t, x, eta)
        want_lp = torch.distributions.Normal(mean, std).log_prob(want).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, want_lp, rtol=1e-4, atol=1e-4)
        # scoring a given sample (DDPO's recomputation) gives the same density and returns it as is
        same, lp2 = sampling.ddim_step(s, eps, t, x, eta, prev_sample=want)
        assert same is want
        torch.testing.assert_close(lp2, want_lp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_mixed_timesteps_in_one_batch(prediction_type):
    s = make_scheduler("sd", prediction_type)
    t = s.timesteps[[0, 6, 9, 3]]
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    prev = torch.stack([s.step(eps[b:b + 1], int(t[b]), x[b:b + 1], eta=1.0, variance_noise=noise[b:b + 1]).prev_sample[0]
                        for b in range(4)])
    got, log_prob = sampling.ddim_step(s, eps, t, x, 1.0, prev_sample=prev)
    for b in range(4):
        mean, std = reference_mean_std(s, eps[b:b + 1], int(t[b]), x[b:b + 1], 1.0)
        want = torch.distributions.Normal(mean, std).log_prob(prev[b:b + 1]).mean()
        torch.testing.assert_close(log_prob[b], want, rtol=1e-4, atol=1e-4)
    # and the sampled x_prev matches row by row as well
    sampled, _ = sampling.ddim_step(s, eps, t, x, 1.0, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for b in range(4):
        want = s.step(eps[b:b + 1], int(t[b]), x[b:b + 1], eta=1.0, variance_noise=noise[b:b + 1]).prev_sample[0]
        torch.testing.assert_close(sampled[b], want, rtol=1e-5, atol=1e-5)


def test_ddim_step_eta0_is_deterministic_and_has_no_log_prob():
    s = make_scheduler("sd", "epsilon")
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(s.timesteps[3])
    got, log_prob = sampling.ddim_step(s, eps, t, x, 0.0)
    torch.testing.assert_close(got, s.step(eps, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
    assert log_prob is None
    with pytest.raises(ValueError, match="eta"):
        sampling.ddim_step(s, eps, t, x, 0.0, prev_sample=got)
    # the last step lands on the scheduler's final alpha (1 here: the step returns the predicted x_0)
    s1 = make_scheduler("sd", "v_prediction", set_alpha_to_one=True)
    t = int(s1.timesteps[-1])
    got, _ = sampling.ddim_step(s1, eps, t, x, 0.0)
    torch.testing.assert_close(got, s1.step(eps, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_step_zero_variance_final_step_has_log_prob_zero():
    # set_alpha_to_one=True (the shapes world's scheduler): the last step lands on the predicted x_0
    # with zero variance even at eta=1; it is scored 0 (no policy gradient), never inf or NaN
    s = make_scheduler("trailing", "v_prediction", set_alpha_to_one=True)
    t = s.timesteps[[len(s.timesteps) - 1, 2]]  # the last step and an ordinary one, in one batch
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    got, log_prob = sampling.ddim_step(s, eps, t, x, 1.0, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    for b in range(2):
        want = s.step(eps[b:b + 1], int(t[b]), x[b:b + 1], eta=1.0, variance_noise=noise[b:b + 1]).prev_sample
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)
    assert log_prob[0] == 0
    mean, std = reference_mean_std(s, eps[1:], int(t[1]), x[1:], 1.0)
    torch.testing.assert_close(log_prob[1:], torch.distributions.Normal(mean, std).log_prob(got[1:]).mean(dim=(1, 2, 3)),
                               rtol=1e-4, atol=1e-4)
    log_prob.sum().backward()
    assert torch.isfinite(eps.grad).all() and eps.grad[0].abs().sum() == 0 and eps.grad[1].abs().sum() > 0


def test_ddim_step_gradient_flows_through_the_mean_only():
    s = make_scheduler("sd", "epsilon")
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, log_prob = sampling.ddim_step(s, eps, int(s.timesteps[2]), x, 1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert prev.grad is None  # the sample is held fixed
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    # a fresh sample is differentiable through the mean (AlignProp back-propagates through it)
    eps.grad = None
    x_prev, _ = sampling.ddim_step(s, eps, int(s.timesteps[2]), x, 1.0)
    x_prev.sum().backward()
    assert eps.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# prompts -> embeddings

def test_encode_prompts_matches_the_pipeline_and_strips_marks(pipe):
    prompts = ["a red circle", "a dolphin riding a bike"]
    want, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(sampling.encode_prompts(pipe, prompts), want)
    marked = sampling.encode_prompts(pipe, ["a (red) (circle)", "a (dolphin) (riding a bike)"])
    torch.testing.assert_close(marked, want)


def test_encode_prompts_weights_exactly_the_phrase_tokens(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    prompts = ["a (dolphin) (riding a bike)", "a (dolphin) (riding a bike)", "a cat on a mat", "(reddish) circle"]
    phrase, w = torch.tensor([1, 0, -1, 0]), torch.tensor([1.2, 1.1, 1.15, 1.05])
    got = sampling.encode_prompts(pipe, prompts, (phrase, w))

    # (first position, number of tokens): every word here is one CLIP token, after <|startoftext|> at 0
    spans = [(3, 3), (2, 1), (1, 5), (1, 1)]
    clean = ["a dolphin riding a bike"] * 2 + ["a cat on a mat", "reddish circle"]
    assert [len(tok(c).input_ids) for c in clean] == [7, 7, 7, 4]
    ids = tok(clean + [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        z = enc(ids)[0]
    for b, (start, n) in enumerate(spans):
        want = z[b].clone()
        want[start:start + n] = z[-1, start:start + n] + w[b] * (z[b, start:start + n] - z[-1, start:start + n])
        torch.testing.assert_close(got[b], want)
        assert not torch.allclose(got[b], z[b])


def test_encode_prompts_unmarked_with_weight_one_is_unchanged(pipe):
    prompts = ["a cat", "a red circle on a dark background"]
    plain = sampling.encode_prompts(pipe, prompts)
    same = sampling.encode_prompts(pipe, prompts, (torch.tensor([-1, -1]), torch.ones(2)))
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the denoising loop

def embeds(pipe, prompts):
    return sampling.encode_prompts(pipe, prompts), sampling.encode_prompts(pipe, [""] * len(prompts))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rollout_reproduces_the_pipeline(pipe, eta):
    cond, uncond = embeds(pipe, ["a red circle", "a blue square"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(), num_inference_steps=6,
                guidance_scale=5.0, eta=eta, output_type="pt", generator=torch.Generator().manual_seed(1)).images
    want_latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(),
                        num_inference_steps=6, guidance_scale=5.0, eta=eta, output_type="latent",
                        generator=torch.Generator().manual_seed(1)).images
    traj = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=6, eta=eta, latents=latents,
                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(traj.latents[:, -1], want_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.images, want, rtol=1e-5, atol=1e-5)
    assert traj.latents.shape == (2, 7, 4, 8, 8) and torch.equal(traj.latents[:, 0], latents)
    assert torch.equal(traj.timesteps, pipe.scheduler.timesteps) and traj.guidance.tolist() == [5.0] * 6
    assert (traj.log_probs is None) == (eta == 0) and (eta == 0 or traj.log_probs.shape == (2, 6))


def test_rollout_per_step_guidance_and_recorded_log_probs():
    pipe = tiny_pipeline(prediction_type="v_prediction")
    pipe.scheduler = DDIMScheduler(prediction_type="v_prediction",  # like the shapes world's
                                   **{**SCHEDULERS["trailing"], "set_alpha_to_one": True})
    cond, uncond = embeds(pipe, ["a (red) circle", "a blue square"])
    cond = sampling.encode_prompts(pipe, ["a (red) circle", "a blue square"], (torch.tensor([0, -1]), torch.tensor([1.2, 1.1])))
    pipe.scheduler.set_timesteps(8)
    scales = explore.cfg_schedule(pipe.scheduler.timesteps, 5.0, w_low=1.0, t_thres=700)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = sampling.rollout(pipe, cond, uncond[:1], scales, num_steps=8, eta=1.0, latents=latents,
                          generator=torch.Generator().manual_seed(2))
    # reference: the pipeline's loop written out, with the scale of each step
    s, x, gen = pipe.scheduler, latents.clone(), torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            u, c = out.chunk(2)
            x = s.step(u + scales[i] * (c - u), t, x, eta=1.0, generator=gen).prev_sample
    torch.testing.assert_close(traj.latents[:, -1], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(traj.guidance, scales) and torch.equal(traj.cond, cond) and traj.uncond.shape == cond.shape
    assert torch.isfinite(traj.log_probs).all() and (traj.log_probs[:, -1] == 0).all()  # x_0 step: zero variance
    # DDPO recomputes each step's log-prob from what the trajectory recorded: the ratio is exactly 1
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps):
            eps = sampling.guided_eps(pipe.unet, traj.latents[:, i], t, traj.cond, traj.uncond, traj.guidance[i])
            _, lp = sampling.ddim_step(pipe.scheduler, eps, t, traj.latents[:, i], traj.eta, prev_sample=traj.latents[:, i + 1])
            torch.testing.assert_close(lp, traj.log_probs[:, i], rtol=0, atol=1e-6)


def test_guided_eps_per_sample_timesteps_and_scales(pipe):
    cond, uncond = embeds(pipe, ["a red circle", "a blue square"])
    x = torch.randn(2, 4, 8, 8)
    t, scale = torch.tensor([900, 100]), torch.tensor([1.0, 7.5])
    got = sampling.guided_eps(pipe.unet, x, t, cond, uncond, scale)
    with torch.no_grad():
        for b in range(2):
            c = pipe.unet(x[b:b + 1], t[b], encoder_hidden_states=cond[b:b + 1]).sample
            u = pipe.unet(x[b:b + 1], t[b], encoder_hidden_states=uncond[b:b + 1]).sample
            torch.testing.assert_close(got[b:b + 1], u + scale[b] * (c - u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_grad_steps_only_through_the_last_k_unet_calls(pipe, k):
    n = 5
    cond, uncond = embeds(pipe, ["a red circle", "a blue square"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    traj = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=n, eta=0.0, latents=latents, grad_steps=k)
    hook.remove()
    assert calls == [False] * (n - k) + [True] * k
    pipe.unet.zero_grad()
    traj.images.mean().backward()
    assert latents.grad is None  # nothing reaches the starting noise through the no_grad steps
    got = {name: p.grad.clone() for name, p in pipe.unet.named_parameters() if p.grad is not None}
    assert got and any(g.abs().sum() > 0 for g in got.values())
    # reference: restart from the stored x at step n-k (detached) and run the last k steps with
    # diffusers' scheduler.step and the VAE, all under grad
    pipe.unet.zero_grad()
    s, x = pipe.scheduler, traj.latents[:, n - k].detach()
    for t in s.timesteps[n - k:]:
        u, c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x = s.step(u + 5.0 * (c - u), t, x, eta=0.0).prev_sample
    images = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    images.mean().backward()
    for name, p in pipe.unet.named_parameters():
        torch.testing.assert_close(got.get(name, torch.zeros_like(p)), p.grad, rtol=1e-4, atol=1e-7)


def test_grad_steps_all_and_none_and_checkpoint(pipe):
    cond, uncond = embeds(pipe, ["a red circle"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    none = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=3, eta=1.0, latents=latents, grad_steps=0,
                          generator=torch.Generator().manual_seed(1))
    assert not none.images.requires_grad and not none.log_probs.requires_grad
    grads = []
    for ckpt in (False, True):
        x0 = latents.clone().requires_grad_()
        traj = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=3, eta=1.0, latents=x0, grad_steps=3,
                              checkpoint=ckpt, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(traj.images, none.images)
        traj.images.mean().backward()
        grads.append(x0.grad)
    assert grads[0].abs().sum() > 0  # with all steps under grad, the starting noise is reached
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_rollout_without_decode_and_bad_arguments(pipe):
    cond, uncond = embeds(pipe, ["a red circle"])
    traj = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=3, decode=False, generator=torch.Generator().manual_seed(0))
    assert traj.images is None and traj.latents.shape == (1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="guidance"):
        sampling.rollout(pipe, cond, uncond, torch.ones(4), num_steps=3)
    with pytest.raises(ValueError, match="grad_steps"):
        sampling.rollout(pipe, cond, uncond, 5.0, num_steps=3, grad_steps=4)


def test_unet_batch_splits_the_calls_not_the_numbers(pipe):
    cond, uncond = embeds(pipe, ["a red circle", "a blue square", "a green cross"] * 2)
    sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    run = lambda **k: sampling.rollout(pipe, cond, uncond, 5.0, num_steps=3, eta=1.0, decode=False,
                                       generator=torch.Generator().manual_seed(0), **k)
    whole, split = run(), run(unet_batch=4)
    hook.remove()
    assert sizes == [12] * 3 + [8, 4] * 3  # with CFG, two rows per sample
    torch.testing.assert_close(split.latents, whole.latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.log_probs, whole.log_probs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# evaluation in micro-batches

def largest_batches(pipe, reward_fn):
    """Hooks recording the largest batch the UNet, the VAE decoder and the reward are ever given."""
    seen = dict(unet=0, vae=0, reward=0)

    def note(part):
        return lambda module, args: seen.__setitem__(part, max(seen[part], len(args[0])))
    hooks = [pipe.unet.register_forward_pre_hook(note("unet")), pipe.vae.decoder.register_forward_pre_hook(note("vae"))]

    def reward(images, prompts):
        seen["reward"] = max(seen["reward"], len(images))
        return reward_fn(images, prompts)
    return seen, hooks, reward


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_evaluation_memory_is_one_micro_batch_and_its_numbers_are_one_batchs(pipe, eta, tmp_path):
    """Evaluation never gives the UNet, the VAE or the reward more than one micro-batch, however many
    prompts x seeds, and scores what one rollout of all the images from the same noise scores (what
    evaluate did before micro-batches: the same generator, drawn in the same order)."""
    appeal = lambda images, prompts: images.mean(dim=(1, 2, 3))  # any per-image score
    prompts = ["a (red) (circle)", "a (blue) square", "a green (cross)", "a purple triangle", "an orange circle"]
    for n_prompts, seeds in ((2, 2), (5, 3)):  # 4 and 15 images
        seen, hooks, reward = largest_batches(pipe, appeal)
        got = evaluation.evaluate(pipe, reward, prompts[:n_prompts], 5.0, 4, eta, seeds, tmp_path / "grid.png",
                                  batch_size=4)
        for h in hooks:
            h.remove()
        assert seen == dict(unet=2 * 4, vae=4, reward=4), (n_prompts, seeds)
        todo = [p for p in prompts[:n_prompts] for _ in range(seeds)]
        with torch.no_grad():
            one = sampling.rollout(pipe, sampling.encode_prompts(pipe, todo), sampling.encode_prompts(pipe, [""]),
                                   5.0, num_steps=4, eta=eta, generator=torch.Generator().manual_seed(1234))
        assert got == pytest.approx(appeal(one.images, todo).mean().item(), rel=1e-5)
        assert evaluation.evaluate(pipe, appeal, prompts[:n_prompts], 5.0, 4, eta, seeds, batch_size=100) == \
            pytest.approx(got, rel=1e-5)


# --------------------------------------------------------------------------------------------
# loading and the CLI

def test_load_pipeline_from_folder(tiny_pipeline_dir):
    p = pipelines.load_pipeline(tiny_pipeline_dir)
    assert isinstance(p.scheduler, DDIMScheduler) and p.safety_checker is None
    assert not any(q.requires_grad for q in p.vae.parameters())
    assert not any(q.requires_grad for q in p.text_encoder.parameters())
    assert p.vae.dtype == p.text_encoder.dtype == p.unet.dtype == torch.float32


def test_load_pipeline_offline_hub_id_fails_with_one_line():
    with pytest.raises(ValueError) as e:
        pipelines.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "--model=shapes" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="no diffusers folder"):
        pipelines.load_pipeline("./no/such/folder")


def test_cli_writes_plain_and_explore_grid(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image
    out = tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--model={tiny_pipeline_dir}", "--prompt=a (red) (circle)",
                                      "--num_seeds=3", "--steps=3", "--explore", f"--out={out}"])
    runpy.run_path(sample.__file__, run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out) and sum("diversity" in l for l in lines) == 2
    w, h = Image.open(out).size
    assert w > 2 * 3 * 16 and h > 16  # two blocks of three tiles next to the caption column
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--model={tiny_pipeline_dir}", "--prompt=a ((red)) circle"])
    with pytest.raises(SystemExit, match="nested"):
        runpy.run_path(sample.__file__, run_name="__main__")


def test_save_grid_rows_and_columns(tmp_path):
    from PIL import Image
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 prompts x 3 seeds, flat
    grids.save_grid(images, ["a red circle", "a (blue) square"], tmp_path / "a.png")
    grids.save_grid([images, images], ["a red circle", "a (blue) square"], tmp_path / "b.png",
                     titles=["plain", "explore"], seeds=[0, 1, 2])
    grids.save_grid(images, ["one", "two", "three"], tmp_path / "c.png")  # 3 rows x 2 columns
    a, b, c = (Image.open(tmp_path / f"{n}.png") for n in "abc")
    assert b.size[0] > a.size[0] and b.size[1] == a.size[1] and c.size[1] > a.size[1] and c.size[0] < a.size[0]
    import numpy as np
    colours = {tuple(v) for v in np.asarray(a.convert("RGB")).reshape(-1, 3).tolist()}
    tiles = (images.permute(0, 2, 3, 1) * 255).round().byte().reshape(-1, 3).tolist()
    assert all(tuple(v) in colours for v in tiles)  # every pixel of every image is on the page
