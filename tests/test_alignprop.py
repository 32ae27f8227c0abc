"""AlignProp / DRaFT: which UNet calls carry gradient, the gradient against finite differences,
randomised K, resume and multi-process equivalence, and bad input."""

import pytest
import torch

import lora
import sampling
from explore import cfg_schedule
from conftest import lora_weights, read_log, record_sampling, run_trainer, torchrun

PROMPTS = ["a (red circle) on a (dark background)", "a (blue square)"]


def brightness(images, prompts):
    """A real (if simple) differentiable reward: mean pixel value."""
    return images.mean(dim=(1, 2, 3))


brightness.differentiable = True


import train_alignprop as ta

SETTINGS = dict(batch_size=2, num_steps=4, eta=0.0, guidance=5.0)  # 4 DDIM steps, deterministic


@pytest.mark.parametrize("truncation, k", [("1", 1), ("3", 3), ("all", 4)])
def test_only_the_last_k_unet_calls_carry_gradient(pipe, truncation, k):
    params = lora.inject(pipe.unet)
    grad_enabled = []
    pipe.unet.register_forward_hook(lambda m, i, o: grad_enabled.append(torch.is_grad_enabled()))
    g = torch.Generator().manual_seed(0)
    assert ta.draw_k(g, truncation, num_steps=4, k_min=1, k_max=4) == k
    r, _ = ta.sample_and_score(pipe, brightness, PROMPTS, sampling.encode_prompts(pipe, [""]), k,
                               sampling.random_streams(0), **SETTINGS)
    assert grad_enabled == [False] * (4 - k) + [True] * k
    r.mean().backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


def test_randomised_k_stays_in_range():
    g = torch.Generator().manual_seed(0)
    ks = [ta.draw_k(g, "rand", num_steps=4, k_min=2, k_max=3) for _ in range(200)]
    assert set(ks) == {2, 3}


def lora_vector(params):
    return torch.cat([p.detach().flatten() for p in params])


def set_lora(params, vec):
    i = 0
    for p in params:
        p.data.copy_(vec[i:i + p.numel()].view_as(p))
        i += p.numel()


@pytest.mark.parametrize("explore", [False, True])
def test_full_backprop_gradient_matches_finite_differences(pipe, explore):
    """With K = all steps and a deterministic sampler (eta=0, fixed noise and prompt weights), the
    loss is a smooth function of the LoRA weights: its autograd gradient must match central finite
    differences along random directions."""
    params = lora.inject(pipe.unet)
    pipe.to(torch.float64)  # finite differences need more than float32's 7 digits
    torch.manual_seed(1)
    for p in params:  # away from B = 0, where the gradient w.r.t. A vanishes
        p.data.normal_(0, 0.3)
    uncond = sampling.encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(4)
    schedule = cfg_schedule(pipe.scheduler.timesteps, w_high=5.0, w_low=1.0, t_thres=500)

    def loss():
        r, _ = ta.sample_and_score(pipe, brightness, PROMPTS, uncond, 4, sampling.random_streams(7),
                                   scale=schedule if explore else None, explore_weights=explore, **SETTINGS)
        return -r.mean()

    check_against_finite_differences(loss, params, directions=3)


def check_against_finite_differences(loss, params, directions, eps=1e-4):
    """loss()'s autograd gradient in the LoRA weights `params`, along random directions, against central
    finite differences (float64 weights: float32's 7 digits are too few)."""
    for p in params:
        p.grad = None
    loss().backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    theta = lora_vector(params)
    for d in range(directions):
        direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(100 + d), dtype=theta.dtype)
        direction /= direction.norm()
        with torch.no_grad():
            set_lora(params, theta + eps * direction)
            plus = loss().item()
            set_lora(params, theta - eps * direction)
            minus = loss().item()
        set_lora(params, theta)
        fd = (plus - minus) / (2 * eps)
        assert grad @ direction == pytest.approx(fd, rel=0.03, abs=1e-6)


def small(tiny_pipeline_dir, prompt_file, out, *extra):
    return [f"--model={tiny_pipeline_dir}", "--reward=shapes_appeal", f"--prompts={prompt_file}",
            "--num_steps=4", "--batch_size=2", "--steps_per_epoch=2", "--epochs=2", "--eval_every=100",
            "--eval_prompts=2", "--eval_seeds=2", f"--out={out}", *extra]


def test_run_logs_k_and_rewards(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, out, "--truncation=rand",
                                          "--k_min=2", "--k_max=3", "--explore",
                                          "--explore_frac=0.5"))
    log = read_log(out)
    assert [r["reward_queries"] for r in log] == [4, 8]
    assert all(k in (2, 3) for r in log for k in r["k"]) and all(len(r["k"]) == 2 for r in log)
    assert [r["explore"] for r in log] == [True, False]  # the first half of 2 epochs
    for name in ("config.json", "reward.png", "ckpt.pt", "eval_base.png", "eval_0001.png"):
        assert (out / name).exists(), name
    assert "eval_before" in log[0] and "eval_before" not in log[1]  # the untrained model's score
    assert any(v.abs().sum() > 0 for k, v in lora_weights(out).items() if "lora_B" in k)


def test_draft_lv_counts_n_queries_per_image_and_sums_the_copies(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, out, "--draft_lv=2", "--epochs=1"))
    (rec,) = read_log(out)
    assert rec["reward_queries"] == 2 * 2 * 2  # steps x batch x n
    # the loss is minus the sum of the 2 copies' mean rewards (Clark et al., Algorithm 2), not their mean
    assert rec["loss"] == pytest.approx(-2 * rec["reward_mean"], rel=1e-5)


def test_draft_lv_gradient_flows_only_through_the_re_noised_last_steps(pipe):
    params = lora.inject(pipe.unet)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(o.sample.requires_grad))
    r, clean = ta.sample_and_score(pipe, brightness, PROMPTS, sampling.encode_prompts(pipe, [""]), 1,
                                   sampling.random_streams(0), draft_lv=2, **SETTINGS)
    # the chain's 4 steps without gradient, then one UNet call per copy with it
    assert calls == [False] * 4 + [True] * 2 and r.shape == (4,) and len(clean) == 4
    ta.reward_loss(r, 2).backward()
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_draft_lv_gradient_against_a_hand_built_graph_of_two_copies(pipe):
    """DRaFT-LV (Clark et al. 2024, arXiv 2309.17400, Sec. 4.2 and Algorithm 2) with n = 2: the final
    latent x_0, sampled without gradient, is noised to the last timestep t_1 by DDPM's forward
    process, x_1 = sqrt(abar_1) x_0 + sqrt(1 - abar_1) eps (Ho et al. 2020, eq. 4), each copy is
    denoised by one guided DDIM step (Song et al. 2021, eq. 12, sigma = 0) with gradient, and the
    two copies' reward gradients are summed. Written out here with two separate UNet passes for
    the guidance and autograd on the whole graph."""
    torch.manual_seed(0)
    params = lora.inject(pipe.unet, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)  # B != 0: the gradient reaches A as well
    prompts, scale = ["a red circle", "a blue square"], torch.full((4,), 5.0)
    cond, uncond = sampling.encode_prompts(pipe, prompts), sampling.encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(4)
    with torch.no_grad():
        traj = sampling.rollout(pipe, cond, uncond, scale, num_steps=4, eta=0.0, decode=False,
                                generator=torch.Generator().manual_seed(1))
    images = ta.draft_lv_images(pipe, traj, cond, uncond, scale, 2, torch.Generator().manual_seed(7))
    ta.reward_loss(brightness(images, prompts * 2), 2).backward()
    got = [p.grad.clone() for p in params]

    x0, t = traj.latents[:, -1], 1  # SD's "leading" spacing at 4 steps: 751, 501, 251, 1
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]
    abar, abar_prev = pipe.scheduler.alphas_cumprod[t], pipe.scheduler.final_alpha_cumprod  # t_0: before the first
    g, loss = torch.Generator().manual_seed(7), 0
    for _ in range(2):
        x1 = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g)
        e_cond = pipe.unet(x1, t, encoder_hidden_states=cond).sample
        e_uncond = pipe.unet(x1, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        eps = e_uncond + 5.0 * (e_cond - e_uncond)
        x0_pred = (x1 - (1 - abar).sqrt() * eps) / abar.sqrt()
        x_prev = abar_prev.sqrt() * x0_pred + (1 - abar_prev).sqrt() * eps
        loss = loss - brightness(sampling.decode_latents(pipe, x_prev), prompts).mean()  # summed over copies
    want = torch.autograd.grad(loss, params)
    assert all(w.abs().sum() > 0 for w in want)
    for a, b in zip(got, want):  # float32, and one batched UNet call for the guidance there, two here
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_pipeline_dir, prompt_file, tmp_path):
    run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, tmp_path / "a", "--epochs=3"))
    b = small(tiny_pipeline_dir, prompt_file, tmp_path / "b", "--epochs=3")
    run_trainer("train_alignprop", *b, "--stop_after=1")
    assert len(read_log(tmp_path / "b")) == 1
    run_trainer("train_alignprop", *b)
    wa, wb = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_pipeline_dir, prompt_file, tmp_path):
    run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, tmp_path / "one", "--epochs=1",
                                          "--grad_accum=2"))
    two = small(tiny_pipeline_dir, prompt_file, tmp_path / "two", "--epochs=1", "--grad_accum=1")
    torchrun("train_alignprop.py", *two)
    a, b = lora_weights(tmp_path / "one"), lora_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # Adam amplifies reduction-order noise in near-zero gradients
    assert read_log(tmp_path / "one")[0]["reward_mean"] == pytest.approx(read_log(tmp_path / "two")[0]["reward_mean"])


@pytest.mark.parametrize("flags, message", [
    (["--reward=jpeg_compressibility"], "train_ddpo.py"),
    (["--reward=beauty"], "unknown reward"),
    (["--truncation=zero"], "--truncation"),
    (["--truncation=9"], "--truncation"),
    (["--truncation=rand", "--k_min=3", "--k_max=2"], "k_min"),
    (["--eta=-1"], "--eta"),
    (["--prompts=no_such_set"], "unknown prompt set"),
])
def test_bad_input_is_a_clear_error_with_nothing_written(tiny_pipeline_dir, prompt_file, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, out), *flags)
    assert message in str(e.value) and str(e.value).startswith("error:")
    assert not out.exists()


def test_same_seed_same_prompts_and_initial_noise_exploring_or_not(tiny_pipeline_dir, prompt_file, tmp_path,
                                                                    monkeypatch):
    """Common random numbers, as in DDPO: exploring draws prompt weights from a stream of its own."""
    runs = {}
    for explore in (False, True):
        seen = record_sampling(monkeypatch)
        run_trainer("train_alignprop", *small(tiny_pipeline_dir, prompt_file, tmp_path / str(explore), "--epochs=1",
                                              *(["--explore"] if explore else [])))
        runs[explore] = seen
        monkeypatch.undo()
    assert runs[False]["prompts"] == runs[True]["prompts"] and len(runs[True]["noise"]) == 4  # 2 updates, 2 evaluations
    assert all(torch.equal(a, b) for a, b in zip(runs[False]["noise"], runs[True]["noise"]))
