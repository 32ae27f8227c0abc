"""Flow-matching models (SD 3.5): sampling.flow_step and the one loop, against independent references:
the scheduler's own Euler step, the reverse SDE written with the exact score of a Gaussian (computed
from the Gaussian's density, not from the velocity as flow_step does) and torch.distributions.Normal,
diffusers' StableDiffusion3Pipeline on a tiny random SD3-shaped pipeline, and the closed-form
marginal of a toy flow whose exact velocity is known."""
import math
import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sampling
from conftest import tiny_sd3_pipeline

# the toy problem: data x_0 ~ N(MU, TAU^2) per dimension (2 channels of a 1x1 latent), noised as
# diffusers' flow schedulers do, x_s = (1 - s) x_0 + s eps (s = sigma = timestep / 1000)
MU = torch.tensor([1.5, -0.5]).reshape(2, 1, 1)
TAU = torch.tensor([0.5, 2.0]).reshape(2, 1, 1)


def exact_velocity(x, s):
    """E[eps - x_0 | x_s = x] of the toy problem, in closed form: x_0 and x_s are jointly Gaussian, with
    Var x_s = (1 - s)^2 TAU^2 + s^2, Cov(x_0, x_s) = (1 - s) TAU^2 and Cov(eps, x_s) = s."""
    var = (1 - s) ** 2 * TAU ** 2 + s ** 2
    r = x - (1 - s) * MU
    return s / var * r - (MU + (1 - s) * TAU ** 2 / var * r)


def exact_score(x, s):
    """grad log p_s(x) of x_s ~ N((1 - s) MU, (1 - s)^2 TAU^2 + s^2), from the density itself."""
    return -(x - (1 - s) * MU) / ((1 - s) ** 2 * TAU ** 2 + s ** 2)


def sd35_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3.5's scheduler_config.json
    scheduler.set_timesteps(steps)
    return scheduler


# --------------------------------------------------------------------------------------------
# the step

def test_the_step_at_zero_noise_is_the_schedulers_euler_step():
    scheduler, ours = sd35_scheduler(8), sd35_scheduler(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 4, 4, generator=g)
    for t in scheduler.timesteps:
        v = torch.randn(x.shape, generator=g)
        want = scheduler.step(v, t, x).prev_sample
        got, log_prob = sampling.flow_step(ours, v, t, x, 0.0)
        assert log_prob is None  # a deterministic step has no log-likelihood
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        x = want
    # a batch of different timesteps, each sample against the scheduler's step at its own timestep
    t = ours.timesteps[torch.tensor([0, 3, 7])]
    v = torch.randn(x.shape, generator=g)
    got, _ = sampling.flow_step(ours, v, t, x, 0.0)
    for b in range(3):
        fresh = sd35_scheduler(8)
        torch.testing.assert_close(got[b], fresh.step(v[b:b + 1], t[b], x[b:b + 1]).prev_sample[0], rtol=0, atol=0)
    assert sampling.step(ours, v, t, x, 0.0)[0].equal(got)  # the loop's step chooses flow_step for this scheduler


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_the_stochastic_step_is_the_reverse_sde_with_the_exact_score_and_normals_log_prob(eta):
    """On the toy problem, where both the velocity and the score are known in closed form: the step's
    mean is x + [v - g^2/2 score] ds with the Gaussian's own score, its std g sqrt(-ds) with
    g = eta sqrt(s / (1 - s)) (Flow-GRPO's noise scale), and its log-prob is Normal's log-density of
    the sample, averaged over the latent dimensions (ddim_step's convention)."""
    scheduler = sd35_scheduler(10)
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([1, 4, 9, 5])  # a batch of different timesteps; not the first (s = 1, below)
    t, s, s_next = scheduler.timesteps[idx], scheduler.sigmas[idx], scheduler.sigmas[idx + 1]
    s, ds = s.reshape(-1, 1, 1, 1), (s_next - s).reshape(-1, 1, 1, 1)
    x = torch.randn(4, 2, 1, 1, generator=g) * 2
    v = exact_velocity(x, s)
    gs = eta * (s / (1 - s)).sqrt()
    mean, std = x + (v - gs ** 2 / 2 * exact_score(x, s)) * ds, gs * (-ds).sqrt()
    noise = torch.randn(x.shape, generator=g)
    x_next, log_prob = sampling.flow_step(scheduler, v, t, x, eta, noise=noise)
    torch.testing.assert_close(x_next, mean + std * noise, rtol=1e-5, atol=1e-6)
    want = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, want, rtol=1e-5, atol=1e-5)
    # scoring a given sample (DDPO's recomputation) gives the same number
    _, again = sampling.flow_step(scheduler, v, t, x, eta, prev_sample=x_next)
    torch.testing.assert_close(again, log_prob, rtol=0, atol=0)
    # a bigger latent: still the per-dimension mean of Normal's log-density
    x, v, other = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
    _, log_prob = sampling.flow_step(scheduler, v, t, x, eta, prev_sample=other)
    want = torch.distributions.Normal(x + (v + gs ** 2 / (2 * s) * (x + (1 - s) * v)) * ds, std).log_prob(other)
    torch.testing.assert_close(log_prob, want.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_the_first_step_from_pure_noise_has_finite_noise():
    """g(s) = eta sqrt(s / (1 - s)) is infinite at s = 1, where sampling starts: the first step takes
    the second's 1 - s instead (as Flow-GRPO's code does). At s = 1 the drift's extra term
    g^2/(2s) (x + (1 - s) v) is g^2/2 x."""
    scheduler = sd35_scheduler(10)
    assert scheduler.sigmas[0] == 1
    x, v, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    x_next, log_prob = sampling.flow_step(scheduler, v, scheduler.timesteps[0], x, 0.7, noise=noise)
    ds = scheduler.sigmas[1] - 1
    g = 0.7 * (1 / -ds).sqrt()
    torch.testing.assert_close(x_next, x + (v + g ** 2 / 2 * x) * ds + g * (-ds).sqrt() * noise, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(log_prob).all()


def test_gradient_flows_through_the_mean_only():
    scheduler = sd35_scheduler(4)
    x, stored = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4, requires_grad=True)
    v = torch.randn(2, 16, 4, 4, requires_grad=True)
    _, log_prob = sampling.flow_step(scheduler, v, scheduler.timesteps[1], x, 0.7, prev_sample=stored)
    grad_v, grad_stored = torch.autograd.grad(log_prob.sum(), [v, stored], allow_unused=True)
    assert grad_v.abs().sum() > 0 and grad_stored is None
    with pytest.raises(ValueError, match="stochastic step"):
        sampling.flow_step(scheduler, v, scheduler.timesteps[1], x, 0.0, prev_sample=stored)
    with pytest.raises(ValueError, match="not in the scheduler's 4-step schedule"):  # a 10-step rollout's timestep
        sampling.flow_step(scheduler, v, sd35_scheduler(10).timesteps[1], x, 0.7)


# --------------------------------------------------------------------------------------------
# the loop on the toy problem: the SDE keeps the flow's marginal

class ExactVelocity(torch.nn.Module):
    """A stand-in for SD 3.5's transformer that returns the toy problem's exact velocity."""
    dtype, device = torch.float32, torch.device("cpu")
    config = types.SimpleNamespace(sample_size=1, in_channels=2)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return types.SimpleNamespace(sample=exact_velocity(hidden_states, (timestep / 1000).reshape(-1, 1, 1, 1)))


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_the_stochastic_rollout_ends_in_the_flows_marginal(eta):
    """sampling.rollout with the exact velocity, from N(0, 1) noise: at eta = 0 it integrates the flow
    ODE, whose final marginal is the data's N(MU, TAU^2); at eta > 0 it samples the SDE with the same
    marginals, so it must end there too, although every sample takes another path.

    Tolerance: n = 40,000 samples give the mean a standard error of TAU / sqrt(n) and the variance
    one of TAU^2 sqrt(2 / n) (0.7% of it); we allow 4 standard errors, plus what the Euler
    discretisation itself moves in 100 steps (its error is O(1/steps): the ODE's variance is 3% low
    here, so 4% is allowed on the variance and 0.01 TAU on the mean). A wrong drift, a missing
    1/2, (1 - s) or square root moves the variance by 28% or more, a flipped sign 20-fold."""
    n, steps = 40_000, 100
    pipe = types.SimpleNamespace(transformer=ExactVelocity(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    record = dict(embeds=torch.zeros(n, 1, 1), pooled=torch.zeros(n, 1))  # the toy flow ignores its conditioning
    x_1 = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    traj = sampling.rollout(pipe, record, sampling.index(record, slice(0, 1)), 1.0, num_steps=steps, eta=eta,
                            latents=x_1, decode=False, generator=torch.Generator().manual_seed(1))
    x_0 = traj.latents[:, -1]
    assert (traj.log_probs is None) == (eta == 0)
    mean_err = (x_0.mean(0) - MU).abs() / TAU
    var_err = (x_0.var(0) / TAU ** 2 - 1).abs()
    assert (mean_err < 4 / math.sqrt(n) + 0.01).all(), mean_err.flatten()
    assert (var_err < 4 * math.sqrt(2 / n) + 0.04).all(), var_err.flatten()
    if eta > 0:  # not the ODE's samples: each path took its own noise
        ode = sampling.rollout(pipe, record, sampling.index(record, slice(0, 1)), 1.0, num_steps=steps, eta=0.0,
                               latents=x_1, decode=False).latents[:, -1]
        assert ((x_0 - ode) / TAU).pow(2).mean() > 0.05


# --------------------------------------------------------------------------------------------
# the loop on a tiny SD3-shaped pipeline, against diffusers' own

PROMPTS = ["a red circle", "a dolphin riding a bike"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def test_the_conditioning_record_is_the_pipelines_encode_prompt(pipe):
    with torch.no_grad():  # as in the pipeline's __call__ (T5's kernels round otherwise with autograd on)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    cond, uncond = sampling.encode_prompts(pipe, PROMPTS), sampling.unconditional(pipe)
    assert set(cond) == {"embeds", "pooled"} and cond["embeds"].shape == (2, 16 + 256, 48)  # CLIP tokens, then T5's
    torch.testing.assert_close(cond["embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(uncond["embeds"], negative[:1], rtol=0, atol=0)
    torch.testing.assert_close(uncond["pooled"], negative_pooled[:1], rtol=0, atol=1e-6)
    marked = sampling.encode_prompts(pipe, ["a (red) (circle)", "a (dolphin) (riding a bike)"])
    assert all(torch.equal(marked[k], cond[k]) for k in cond)  # the marks are stripped


def test_with_t5_the_record_is_the_pipelines_too():
    pipe = tiny_sd3_pipeline(t5=True)
    with torch.no_grad():  # as in the pipeline's __call__ (T5's kernels round otherwise with autograd on)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    cond, uncond = sampling.encode_prompts(pipe, PROMPTS), sampling.unconditional(pipe)
    assert cond["embeds"][:, 16:].abs().sum() > 0  # T5's token states, not zeros
    torch.testing.assert_close(cond["embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(uncond["embeds"], negative[:1], rtol=0, atol=0)


def test_rollout_at_zero_noise_reproduces_the_sd3_pipeline(pipe):
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(prompt=PROMPTS, latents=latents, num_inference_steps=6, guidance_scale=5.0)
    want_latents = pipe(**run, output_type="latent").images
    want = pipe(**run, output_type="pt").images
    traj = sampling.rollout(pipe, sampling.encode_prompts(pipe, PROMPTS), sampling.unconditional(pipe), 5.0,
                            num_steps=6, eta=0.0, latents=latents)
    torch.testing.assert_close(traj.latents[:, -1], want_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.images, want, rtol=1e-5, atol=1e-5)
    assert traj.images.shape == (2, 3, 16, 16) and traj.log_probs is None


def test_recorded_sd3_steps_recompute_the_same_log_probs(pipe):
    """What DDPO and PRDP do with a flow model: sample with noise, then replay the record step by step."""
    prompts = ["a (red) circle", "a (blue) (square)", "a cat", "a (dolphin) riding a bike"]  # DiffExp's weighting too
    cond = sampling.encode_prompts(pipe, prompts, (torch.tensor([0, 1, -1, 0]), torch.tensor([1.2, 1.1, 1.05, 1.15])))
    scales = torch.tensor([1.0, 1.0, 5.0, 5.0])
    traj = sampling.rollout(pipe, cond, sampling.unconditional(pipe), scales, num_steps=4, eta=0.7,
                            generator=torch.Generator().manual_seed(0))
    assert traj.log_probs.shape == (4, 4) and torch.isfinite(traj.log_probs).all()
    data = dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond, uncond=traj.uncond,
                scale=scales.expand(4, 4))
    again = sampling.replay(pipe.transformer, pipe.scheduler, data, traj.timesteps, 0.7, batch_size=3)
    torch.testing.assert_close(again, traj.log_probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_reward_gradient_reaches_the_transformer_through_the_last_k_euler_steps(pipe, checkpoint):
    """AlignProp's and DRaFT's chain on SD 3.5: the deterministic Euler steps, gradient on the last K."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        traj = sampling.rollout(pipe, sampling.encode_prompts(pipe, PROMPTS), sampling.unconditional(pipe), 5.0,
                                num_steps=4, eta=0.0, grad_steps=2, checkpoint=checkpoint,
                                latents=torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)))
        traj.images.mean().backward()
    finally:
        hook.remove()
    assert calls[:4] == [False, False, True, True]  # then the checkpointed calls' recomputation, if any
    grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    pipe.transformer.zero_grad(set_to_none=True)
