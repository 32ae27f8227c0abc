"""PRDP: the pairwise loss against a hand computation, the step-by-step gradient against autograd
on the whole graph, on-policy first updates, resume and multi-process equivalence, and bad input,
on a tiny random SD-shaped pipeline."""
import itertools
import os

import pytest
import torch

import lora
import sampling
import train_prdp
from conftest import lora_weights, read_log, run_trainer, torchrun


def small(tiny_pipeline_dir, prompt_file, out, *extra):
    return [f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility", f"--prompts={prompt_file}",
            "--num_steps=4", "--prompts_per_epoch=2", "--images_per_prompt=3", "--sample_batch_size=3",
            "--train_batch_size=3", "--updates_per_epoch=2", "--epochs=2", "--eval_every=100",
            "--eval_prompts=2", "--eval_seeds=2", f"--out={out}", *extra]


def app_g_loss(R, R_clip, r, N, B, beta):
    """PRDP's loss as the paper's code in App. G (Deng et al. 2024) computes it, transcribed with its
    shapes: every quantity [N prompts, B images], the pairwise differences [N, B, B] by broadcasting
    (every ordered pair of a prompt, ties and i == j included), the elementwise max of the unclipped
    and clipped squared errors, and the mean over all N x B x B entries."""
    R, R_clip, r = R.reshape(N, B), R_clip.reshape(N, B), r.reshape(N, B)
    target = (r[:, :, None] - r[:, None, :]) / beta
    unclipped = (R[:, :, None] - R[:, None, :] - target) ** 2
    clipped = (R_clip[:, :, None] - R_clip[:, None, :] - target) ** 2
    return torch.maximum(unclipped, clipped).mean()


def test_rdp_loss_is_app_gs_on_a_batch_with_ties():
    # two prompts of 3 images; discrete rewards as shapes_success gives them, with ties in both groups
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    R = torch.tensor([0.10, 0.30, -0.20, 0.05, 0.00, 0.20], requires_grad=True)
    R_clip = torch.tensor([0.10, 0.12, -0.20, 0.07, 0.00, 0.20], requires_grad=True)
    loss, corr, size = train_prdp.rdp_loss(R, R_clip, r, groups, 10.0)
    want = app_g_loss(R, R_clip, r, 2, 3, 10.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    got_grads = torch.autograd.grad(loss, (R, R_clip))
    want_grads = torch.autograd.grad(want, (R, R_clip))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert got_grads[1].abs().sum() > 0 and got_grads[0].abs().sum() > 0  # both branches of the max act
    # the diagnostics look at the untied pairs only: (0, 1), (2, 1), (5, 3), (5, 4)
    x = R.detach()
    p = torch.stack([x[0] - x[1], x[2] - x[1], x[5] - x[3], x[5] - x[4]])
    q = torch.full((4,), 0.1)
    assert size == pytest.approx((p.pow(2).mean() / q.pow(2).mean()).sqrt().item(), rel=1e-6)
    assert corr == 0.0  # every untied target is 0.1 here: no variance to correlate with


def test_rdp_loss_with_only_ties_pulls_the_predictions_together():
    r = torch.ones(4)
    R = torch.tensor([0.3, -0.1, 0.2, 0.2], requires_grad=True)
    loss, corr, size = train_prdp.rdp_loss(R, R, r, torch.tensor([0, 0, 1, 1]), 1.0)
    assert loss.item() == pytest.approx(app_g_loss(R, R, r, 2, 2, 1.0).item()) and corr == size == 0
    loss.backward()
    # group 0 is pulled together (the higher prediction down, the lower up); group 1 already agrees
    assert R.grad[0] > 0 > R.grad[1] and R.grad[2] == R.grad[3] == 0


def test_step_by_step_gradient_equals_autograd_on_the_whole_graph(pipe):
    """What train_prdp does (step_weights, then replay one step and micro-batch at a time) gives the
    gradient that autograd gives on the whole graph of all steps of all trajectories, with steps
    inside and outside the clip band and a tied pair."""
    torch.manual_seed(0)
    params = lora.inject(pipe.unet, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)
    pipe.unet.double()  # float64 throughout, LoRA included: the two gradients differ only by rounding
    T, eta, eps, beta = 3, 1.0, 2e-3, 0.05
    prompts = ["a red circle"] * 3 + ["a blue square"] * 3
    cond = sampling.encode_prompts(pipe, prompts)
    uncond = sampling.encode_prompts(pipe, [""]).expand(len(prompts), -1, -1)
    with torch.no_grad():
        traj = sampling.rollout(pipe, cond, uncond, torch.tensor([2.0, 5.0, 5.0]), num_steps=T, eta=eta,
                                generator=torch.Generator().manual_seed(0), decode=False)
    data = dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond, uncond=traj.uncond,
                scale=traj.guidance.expand(len(prompts), -1))
    unet, scheduler, timesteps = pipe.unet, pipe.scheduler, traj.timesteps
    with lora.disabled(unet):
        lp_ref = sampling.replay(unet, scheduler, data, timesteps, eta, 4)
    with torch.no_grad():  # move theta away from the sampling model, as after an update
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    new = sampling.replay(unet, scheduler, data, timesteps, eta, 4) - lp_ref
    # an `old` that puts about half of the steps outside the clip band
    old = new + eps * torch.tensor([0.5, 1.5, -0.5, -1.5]).repeat(5)[:new.numel()].reshape(new.shape)
    r = torch.tensor([1.0, 2.0, 1.0, 0.3, 0.9, 0.1])  # a tie in the first group
    groups = torch.arange(6) // 3

    # the whole graph: every step of every trajectory with gradient, then autograd
    lps = []
    for s in range(T):
        eps_pred = sampling.guided_eps(unet, data["latents"][:, s], timesteps[s], data["cond"], data["uncond"],
                                       data["scale"][:, s])
        lps.append(sampling.ddim_step(scheduler, eps_pred, timesteps[s], data["latents"][:, s], eta,
                                      prev_sample=data["latents"][:, s + 1])[1])
    new_graph = torch.stack(lps, 1) - lp_ref
    clipped = torch.clamp(new_graph, old - eps, old + eps)
    loss, _, _ = train_prdp.rdp_loss(new_graph.mean(1), clipped.mean(1), r, groups, beta)
    loss.backward()
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # step by step, micro-batches of 4 and 2 trajectories
    w, loss2, _, _, inside = train_prdp.step_weights(new, old, r, groups, beta, eps)
    assert 0 < inside.float().mean() < 1  # both sides of the clip band are exercised
    assert loss2 == pytest.approx(loss.item(), rel=1e-5)
    lp = sampling.replay(unet, scheduler, data, timesteps, eta, 4, weights=w)
    torch.testing.assert_close(lp - lp_ref, new, rtol=0, atol=1e-12)
    assert sum(p.grad.abs().sum() for p in params) > 0
    for a, b in zip(full, [p.grad for p in params]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("explore", [False, True])
def test_first_update_is_on_policy(tiny_pipeline_dir, prompt_file, tmp_path, explore):
    flags = ["--explore", "--t_thres=500"] if explore else []
    run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, tmp_path / "run", "--epochs=1", *flags))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] is explore
    assert rec["ratio_dev"] < 1e-6  # theta_old recomputes the very log-probs it sampled with
    assert rec["kl_ref"] == pytest.approx(0, abs=1e-6)  # B = 0: theta is p_ref (whatever p_ref is: the next test)
    assert rec["reward_queries"] == 6 and rec["grad_norm"] > 0 and rec["loss"] > 0


def test_kl_ref_is_measured_against_the_pretrained_model(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    """kl_ref = 0 before any update (above) holds whatever p_ref is, since the LoRA starts at zero.
    After an update it must be log p_theta_old - log p_ref with p_ref the PRETRAINED model: here
    recomputed on epoch 1's samples by a freshly loaded pipeline that has no LoRA at all. Were the
    LoRA not switched off for the reference, p_ref would be theta_old itself and kl_ref ~ 0."""
    from diffusers import StableDiffusionPipeline
    trajs, real_rollout = [], sampling.rollout
    monkeypatch.setattr(sampling, "rollout", lambda *a, **k: trajs.append(real_rollout(*a, **k)) or trajs[-1])
    run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, tmp_path / "run", "--lr=0.03"))
    kl_logged = read_log(tmp_path / "run")[1]["kl_ref"]
    epoch1 = [t for t in trajs if len(t.latents) == 3][-2:]  # 2 sampling calls of 3 a epoch (evaluation: 4)
    pretrained = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pretrained.scheduler.set_timesteps(4)
    gaps = []
    for t in epoch1:
        data = dict(latents=t.latents, log_probs=t.log_probs, cond=t.cond, uncond=t.uncond.expand(len(t.latents), -1, -1),
                    scale=t.guidance.expand(len(t.latents), -1))
        lp_pretrained = sampling.replay(pretrained.unet, pretrained.scheduler, data, t.timesteps, 1.0, 3)
        gaps.append(t.log_probs - lp_pretrained)
    kl = torch.cat(gaps).mean().item()
    assert abs(kl) > 1e-5  # the update moved theta far enough to tell p_ref from theta_old
    assert kl_logged == pytest.approx(kl, rel=1e-5), (kl_logged, kl)


def test_exploring_run_folder_and_lora_loads_in_diffusers(tiny_pipeline_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, out, "--eval_every=2", "--explore",
                                     "--t_thres=500", "--explore_frac=0.5"))
    for name in ("config.json", "log.jsonl", "reward.png", "ckpt.pt", "eval_base.png", "eval_0001.png"):
        assert (out / name).exists(), name
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and [r["reward_queries"] for r in log] == [6, 12]
    assert [r["explore"] for r in log] == [True, False]
    assert "eval_before" in log[0] and "eval_reward" in log[1] and "eval_reward" not in log[0]
    for rec in log:
        for key in ("loss", "pred_corr", "pred_ratio", "clipfrac", "ratio_dev", "kl_ref", "grad_norm",
                    "reward_mean", "reward_std", "seconds"):
            assert torch.isfinite(torch.tensor(rec[key])), (key, rec[key])
    assert log[1]["kl_ref"] != 0  # after an update, theta_old is no longer the pretrained model
    weights = lora_weights(out)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained
    # plain diffusers loads the run's LoRA and computes what our LoRA layers compute
    ours = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    lora.load(ours.unet, out / "lora")
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    theirs.load_lora_weights(str(out / "lora"))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.unet(x, t, c).sample, ours.unet(x, t, c).sample, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_pipeline_dir, prompt_file, tmp_path):
    run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, tmp_path / "a", "--epochs=3"))
    interrupted = small(tiny_pipeline_dir, prompt_file, tmp_path / "b", "--epochs=3")
    run_trainer("train_prdp", *interrupted, "--stop_after=1")
    assert len(read_log(tmp_path / "b")) == 1
    run_trainer("train_prdp", *interrupted)  # the same command, re-run
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in la] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in lb]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_pipeline_dir, prompt_file, tmp_path):
    # one process: 2 prompt groups (2 sampling calls); two processes: 1 group each. Same samples,
    # same pairs, the loss over all of them, gradients averaged across processes: the same K=2
    # updates (the second one on log-ratios gathered from both processes).
    # beta: JPEG-size rewards differ by ~0.01, so targets of ~1, gradients far above Adam's eps
    run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, tmp_path / "one", "--epochs=1", "--beta=0.01"))
    two = small(tiny_pipeline_dir, prompt_file, tmp_path / "two", "--epochs=1", "--beta=0.01", "--prompts_per_epoch=1")
    torchrun("train_prdp.py", *two)
    a, b = lora_weights(tmp_path / "one"), lora_weights(tmp_path / "two")
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # Adam amplifies reduction-order noise
    (one,), (two,) = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert one["reward_queries"] == two["reward_queries"] == 6 and one["reward_mean"] == pytest.approx(two["reward_mean"])
    for key in ("loss", "clipfrac", "grad_norm"):  # the loss is over both processes' pairs
        assert one[key] == pytest.approx(two[key], rel=1e-3), key


@pytest.mark.parametrize("flags, message", [
    (["--beta=0"], "--beta must be > 0"),
    (["--beta=-1"], "--beta must be > 0"),
    (["--images_per_prompt=1", "--sample_batch_size=1"], "--images_per_prompt must be >= 2"),
    (["--eta=0"], "--eta must be in (0, 1]"),
    (["--clip_eps=0"], "--clip_eps must be > 0"),
    (["--sample_batch_size=4"], "must be a multiple of images_per_prompt"),
    (["--updates_per_epoch=0"], "--updates_per_epoch"),
    (["--reward=beauty"], "beauty"),
    (["--prompts=no_such_set"], "unknown prompt set"),
    (["--beta_kl=1"], "unknown option --beta_kl; did you mean --beta"),
])
def test_bad_input_is_a_clear_error_with_nothing_written(tiny_pipeline_dir, prompt_file, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_trainer("train_prdp", *small(tiny_pipeline_dir, prompt_file, out), *flags)
    text = str(e.value)
    assert message in text and text.startswith("error:") and "\n" not in text
    assert not out.exists()
