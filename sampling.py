"""Sampling: the denoising loop with classifier-free guidance (DDIM for SD 1.5 and SDXL, the flow step
for SD 3.5), and everything the reward fine-tuners need from it (latents, log-probs, guidance
scales, prompt embeddings).

    import explore, pipelines, sampling
    pipe = pipelines.load_pipeline("shapes")
    cond = sampling.encode_prompts(pipe, ["a (red) (circle) on a (dark) background"] * 4)
    traj = sampling.rollout(pipe, cond, sampling.unconditional(pipe), guidance=5.0, eta=1.0)
    traj.images, traj.log_probs                        # [4, 3, 32, 32] in [0, 1]; [4, 20]

Read next to the DDIM paper (Song et al. 2021, eq. 12 and 16), DDPO (Black et al. 2024, Sec. 4:
denoising as a multi-step decision process with Gaussian policies), Flow-GRPO (Liu et al. 2025,
Sec. 4: the same for flow matching) and DiffExp (Chae et al. 2025).
`python sample.py` is the command-line front end (image grids); the trainers' evaluation and the
grids' sampling are in plumbing/evaluation.py.
"""
import math
from dataclasses import dataclass

import torch

import explore
from plumbing import mixed_precision
# --------------------------------------------------------------------------------------------
# The conditioning record: everything the UNet is conditioned on, one row per sample
#
# SD 1.5 (and the shapes world) condition the UNet on the prompt's token embeddings alone: the
# record is a Tensor [B, L, D]. SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models
# for High-Resolution Image Synthesis", Sec. 2.1-2.2) also conditions on the second text encoder's
# pooled embedding and on the image's size and crop: its record is a dict of per-sample tensors
#     {"embeds": [B, L, D], "text_embeds": [B, P], "time_ids": [B, 6]}.
# SD 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
# Synthesis", Sec. 5.1 and Fig. 2) conditions its transformer on the token states of two CLIP
# encoders and T5 and on both CLIPs' pooled embeddings: {"embeds": [B, L, D], "pooled": [B, P]}.
# The sampling loop records it and the trainers store, slice and replay it through the helpers
# below, whichever kind it is, so a recomputed log-prob sees exactly what drew the sample.

def _each(fn, *records):
    """fn applied to records' tensors: to the Tensor itself, or key by key to SDXL's dicts."""
    if isinstance(records[0], dict):
        return {k: fn(*(r[k] for r in records)) for k in records[0]}
    return fn(*records)


def cat(records):
    """torch.cat along the batch, of tensors and conditioning records alike."""
    return _each(lambda *ts: torch.cat(ts), *records)


def index(record, i):
    """Samples `i` (an index tensor or a slice) of a conditioning record."""
    return _each(lambda t: t[i], record)


def expand(record, n):
    """A one-row record (the unconditional one) as n rows, without copying."""
    return _each(lambda t: t.expand(n, *t.shape[1:]), record)


def to_device(record, device):
    return _each(lambda t: t.to(device), record)


def num_samples(record):
    return (record["embeds"] if isinstance(record, dict) else record).shape[0]


def unet_inputs(record, dtype):
    """The denoiser's keyword arguments for a conditioning record, in the denoiser's dtype."""
    if not isinstance(record, dict):  # SD 1.5
        return dict(encoder_hidden_states=record.to(dtype))
    if "time_ids" in record:  # SDXL: the pooled embedding and time ids go in as "added" conditioning
        return dict(encoder_hidden_states=record["embeds"].to(dtype),
                    added_cond_kwargs={"text_embeds": record["text_embeds"].to(dtype),
                                       "time_ids": record["time_ids"].to(dtype)})
    # SD 3.5: the pooled embeddings join the timestep's embedding (SD3Transformer2DModel.forward)
    return dict(encoder_hidden_states=record["embeds"].to(dtype), pooled_projections=record["pooled"].to(dtype))


# --------------------------------------------------------------------------------------------
# Prompts -> conditioning records (DiffExp's random prompt weighting happens here)

def is_sdxl(pipe):
    return getattr(pipe, "text_encoder_2", None) is not None and not is_sd3(pipe)


def is_sd3(pipe):
    """SD 3.5 (a StableDiffusion3Pipeline): an MM-DiT transformer instead of a UNet."""
    return hasattr(pipe, "transformer")


def denoiser(pipe):
    """The network that predicts the noise or the velocity: SD 1.5's and SDXL's UNet, SD 3.5's
    transformer. The loop, the LoRA and the trainers see it under the one name `unet`."""
    return pipe.transformer if is_sd3(pipe) else pipe.unet


T5_TOKENS = 256  # SD 3.5's T5 token count: its pipeline's default max_sequence_length


def _token_states(tokenizer, encoder, texts, penultimate):
    """(per-token states [B, L, D] fp32, the encoder's output) of `texts`, padded to the tokenizer's
    max length as SD, SDXL and SD 3.5 do."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(encoder.device), output_hidden_states=penultimate)
    # SD 1.5 conditions on the last layer's (final-layer-normed) states; SDXL and SD 3.5 on the penultimate
    # layer's, not normed, of both CLIPs (their pipelines' encode_prompt; Podell et al., Sec. 2.1)
    return (out.hidden_states[-2] if penultimate else out.last_hidden_state).float(), out


def add_time_ids(pipe, n):
    """SDXL's micro-conditioning (Podell et al., Sec. 2.2), [n, 6]: original size, crop top-left and
    target size, (h, w, 0, 0, h, w) for an uncropped image at the UNet's resolution, as its
    pipeline's _get_add_time_ids builds them by default."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)


@torch.no_grad()
def encode_prompts(pipe, prompts, weights=None):
    """The conditioning record of `prompts` with their (phrase) marks stripped: SD's text embeddings
    [B, L, D] (fp32), or SDXL's or SD 3.5's dict (above). `weights` = (phrase [B], w [B]) from
    explore.draw_weights up-weights each prompt's chosen phrase (-1: the whole prompt), in every
    encoder's token states: SDXL's two CLIPs, SD 3.5's two CLIPs and T5."""
    sdxl, sd3 = is_sdxl(pipe), is_sd3(pipe)
    two = sdxl or sd3  # two CLIP encoders, each conditioning on its penultimate layer
    encoders = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if two else [])
    parsed = [explore.parse_spans(p) for p in prompts]
    clean = [c for c, _ in parsed]
    states, pooled = [], []
    for tokenizer, encoder in encoders:
        z, out = _token_states(tokenizer, encoder, clean, two)
        if weights is not None:
            z = _weighted(tokenizer, z, _token_states(tokenizer, encoder, [""], two)[0], parsed, weights)
        states.append(z)
        pooled.append(getattr(out, "text_embeds", None))  # a CLIPTextModelWithProjection's pooled embedding
    if sd3:
        return _sd3_record(pipe, parsed, states, pooled, weights)
    if not sdxl:
        return states[0]
    # SDXL: both encoders' token states side by side (768 + 1280 = 2048 features for SDXL base) and
    # the second encoder's pooled, projected embedding (`out` is the last encoder's output).
    # The pooled vector is left unweighted, the clean prompt's: it summarises the whole prompt in one
    # vector with no token positions, so there is no phrase in it to up-weight (scaling it would
    # up-weight the whole prompt instead), and compel, whose z_empty + w (z - z_empty) rule the
    # weighting follows, also takes it from the prompt's tokens without their weights
    # (damian0815/compel, EmbeddingsProvider.get_pooled_embeddings). The phrase's extra weight reaches
    # the UNet through cross-attention, on the tokens, as on SD 1.5.
    return dict(embeds=torch.cat(states, dim=-1), text_embeds=out.text_embeds.float(),
                time_ids=add_time_ids(pipe, len(prompts)).to(states[0].device))


def _weighted(tokenizer, z, z_empty, parsed, weights):
    """DiffExp's random prompt weighting on one encoder's token states z [B, L, D]: z_empty + w (z - z_empty)
    on each prompt's chosen phrase's tokens, z elsewhere (explore.py); z_empty is the encoding of ""."""
    phrase, w = weights
    mask = explore.phrase_mask(tokenizer, parsed, phrase, z.shape[1])
    return explore.weight_embeddings(z, z_empty, mask, w.to(z.device))


def _t5_states(pipe, texts):
    """T5's token states [B, 256, D] (fp32) of `texts`, as SD 3.5's pipeline computes them
    (_get_t5_prompt_embeds: padded to 256 tokens, ending in </s>, the last layer's states)."""
    ids = pipe.tokenizer_3(texts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
    return pipe.text_encoder_3(ids.to(pipe.text_encoder_3.device))[0].float()


def _sd3_record(pipe, parsed, states, pooled, weights=None):
    """SD 3.5's record, as its pipeline's encode_prompt builds it: both CLIPs' penultimate token states
    side by side, zero-padded to T5's width, then T5's token states after them in the sequence (zeros
    when the pipeline has no T5, as its pipeline uses then); the pooled embeddings side by side.
    DiffExp's weights reach T5's tokens as they reach the CLIPs' (`states` come weighted): the phrase's
    T5 tokens get the same z_empty + w (z - z_empty), z_empty T5's encoding of "". The pooled
    embeddings stay the clean prompt's, as SDXL's (encode_prompts says why)."""
    clean = [c for c, _ in parsed]
    clip = torch.cat(states, dim=-1)
    width = pipe.transformer.config.joint_attention_dim
    if pipe.text_encoder_3 is None:
        t5 = torch.zeros(len(clean), T5_TOKENS, width, device=clip.device)
    else:
        t5 = _t5_states(pipe, clean)
        if weights is not None:
            t5 = _weighted(pipe.tokenizer_3, t5, _t5_states(pipe, [""]), parsed, weights)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    return dict(embeds=torch.cat([clip, t5.to(clip.device)], dim=-2), pooled=torch.cat(pooled, dim=-1).float())


@torch.no_grad()
def unconditional(pipe):
    """The unconditional record of classifier-free guidance, one row (rollout expands it): the
    encoding of the empty prompt, or, for SDXL without a negative prompt, zeros for both
    embeddings when the model's config says force_zeros_for_empty_prompt (SDXL base does; its
    pipeline's encode_prompt), with the prompts' time ids. SD 3.5's pipeline always encodes ""."""
    empty = encode_prompts(pipe, [""])
    if is_sdxl(pipe) and pipe.config.force_zeros_for_empty_prompt:
        return dict(empty, embeds=torch.zeros_like(empty["embeds"]), text_embeds=torch.zeros_like(empty["text_embeds"]))
    return empty


# --------------------------------------------------------------------------------------------
# One denoising step: classifier-free guidance, then DDIM as a Gaussian policy

def guided_eps(unet, x, t, cond, uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond), with the
    unconditional and conditional passes batched into ONE UNet call. `t` and `scale` may be
    scalars or per-sample [B]. Returns what the UNet predicts (epsilon or v; SD 3.5's transformer: the
    velocity), in x's dtype (fp32).

    A bf16 or fp16 UNet (--precision, plumbing/mixed_precision.py) computes under autocast; its output is cast
    back to fp32 here, so the DDIM step and the log-probs never see bf16's rounding."""
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
    both = unet_inputs(cat([expand(uncond, b), cond]), unet.dtype)  # conditioning records (above)
    with mixed_precision.autocast(unet):
        # the timestep by name: SD3Transformer2DModel's second positional argument is the text
        out = unet(torch.cat([x, x]).to(unet.dtype), timestep=torch.cat([t, t]), **both).sample
    out_uncond, out_cond = out.to(x.dtype).chunk(2)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return out_uncond + scale * (out_cond - out_uncond)


def ddim_step(scheduler, eps, t, x_t, eta, prev_sample=None, generator=None, noise=None):
    """x_t -> x_{t_prev} with DDIM (eq. 12 and 16 of the DDIM paper), returning (x_prev, log_prob).

    The step is the Gaussian policy N(mean, std^2) of DDPO (Sec. 4): mean from the predicted x_0
    and noise, std = eta * sigma_t. x_prev is a fresh sample (or `prev_sample`, to score a stored
    trajectory); log_prob is its log-density, None when eta == 0 (a deterministic step has none;
    scoring a given sample with eta=0 is an error)
    `eps` is the model output in the scheduler's prediction_type (epsilon or v), `t` an int or a
    batch of different timesteps [B]. `noise`: the standard normal draw to use, instead of drawing
    one from `generator`. Gradient flows into x_prev and log_prob through the mean only.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step")
    if scheduler.config.thresholding:
        raise ValueError("dynamic thresholding is not supported; load the scheduler with thresholding=False")
    if eta == 0 and prev_sample is not None:
        raise ValueError("a log-prob needs a stochastic step: eta=0 has zero variance; sample with eta > 0")
    shape = (-1, *[1] * (x_t.ndim - 1))
    t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
    # t_prev is one stride earlier (as diffusers computes it); below 0 the scheduler's final
    # alpha is used (1 with set_alpha_to_one, else alpha_bar_0).
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    a_t = alphas[t].reshape(shape).to(x_t.dtype)
    a_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)],
                         scheduler.final_alpha_cumprod.to(x_t.device)).reshape(shape).to(x_t.dtype)
    eps = eps.to(x_t.dtype)
    if scheduler.config.prediction_type == "epsilon":
        x0, noise_pred = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt(), eps
    elif scheduler.config.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
        x0, noise_pred = a_t.sqrt() * x_t - (1 - a_t).sqrt() * eps, a_t.sqrt() * eps + (1 - a_t).sqrt() * x_t
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported; use epsilon or v_prediction")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    # eq. 16: sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev); eta scales it (0 = DDIM, 1 = DDPM)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    # eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * noise_pred
    if eta == 0:
        return mean, None
    if prev_sample is None:
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor
            noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = mean + std * noise.to(x_t.device, x_t.dtype)
    # The sample itself is held fixed (detached): the policy gradient flows through the mean.
    # A scheduler with set_alpha_to_one=True (the shapes world's) makes the last step x_prev = x0
    # with zero variance even for eta > 0: not a random action, so it gets log_prob 0 and adds no
    # policy gradient (std is swapped for 1 there first, so no inf/NaN reaches the gradient).
    random = std > 0
    safe_std = torch.where(random, std, torch.ones_like(std))
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * safe_std ** 2) - safe_std.log() - math.log(math.sqrt(2 * math.pi))
    log_prob = torch.where(random, log_prob, torch.zeros_like(log_prob))
    # Averaged, not summed, over the latent dimensions: a sum over 16k dims (SD's 4x64x64) makes
    # the PPO ratio exp(logp_new - logp_old) overflow after tiny updates; the mean keeps it O(1).
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim)))


# --------------------------------------------------------------------------------------------
# One flow-matching step (Stable Diffusion 3.5): the Euler step of the flow ODE, and the SDE with
# the same marginals as a Gaussian policy (Flow-GRPO: Liu et al. 2025, "Flow-GRPO: Training Flow
# Matching Models via Online RL", Sec. 4, "From ODE to SDE", derived in its appendix)
#
# Conventions, diffusers' FlowMatchEulerDiscreteScheduler's (Flow-GRPO writes t for our s):
#   s = scheduler.sigmas[i] runs from 1 (pure noise) down to 0 (data); timesteps are s * 1000
#   x_s = (1 - s) x_0 + s eps                                                          (F1)
#   the model predicts the velocity v(x, s) = E[eps - x_0 | x_s = x] = dx_s/ds
# Sampling moves s downwards, so ds = s_next - s < 0 in every step below.
#
#   The ODE:    dx = v ds; its Euler step x_next = x + v ds is the scheduler's own step.    (F2)
#   The score of x_s's marginal, from (F1): x = E[x_0|x] (1 - s) + E[eps|x] s and v = E[eps|x] - E[x_0|x]
#   give E[eps|x] = x + (1 - s) v, and for a Gaussian corruption grad log p_s(x) = -E[eps|x] / s:
#       grad log p_s(x) = -(x + (1 - s) v) / s                                          (F3)
#   An SDE with the ODE's marginals, for any noise scale g(s): dx = [v + g^2/2 grad log p_s] ds + g dW
#   run forwards in s has the ODE's Fokker-Planck equation (its diffusion term g^2/2 Lap p cancels
#   the extra drift's -div(p g^2/2 grad log p), as p grad log p = grad p). Its time reversal (Anderson
#   1982: subtract g^2 grad log p from the drift), run with s decreasing, is the sampler; with (F3):
#       dx = [v - g^2/2 grad log p_s(x)] ds + g dW = [v + g^2/(2s) (x + (1 - s) v)] ds + g dW      (F4)
#   Flow-GRPO's noise scale: g(s) = a sqrt(s / (1 - s)), a the noise level (eta's role in DDIM;
#   Flow-GRPO trains SD 3.5 with a = 0.7). Its Euler-Maruyama step is the Gaussian policy
#       x_next ~ N(x + [v + g^2/(2s) (x + (1 - s) v)] ds,  g^2 |ds|)                     (F5)
#   whose log-density is DDPO's log pi(a|s) for flow models.
# (Flow-GRPO's equation numbers were not checked against the paper here: F1-F5 are ours.)

def flow_step(scheduler, v, t, x_t, eta, prev_sample=None, generator=None, noise=None):
    """x_s -> x_{s_next} for a FlowMatchEulerDiscreteScheduler model, returning (x_next, log_prob),
    with ddim_step's signature and contract: `eta` is Flow-GRPO's noise level a (F5); eta == 0 is the
    deterministic Euler step (F2), the scheduler's own `step`, with log_prob None (AlignProp's
    differentiable chain and evaluation); eta > 0 samples (F5), or scores `prev_sample`.
    `v` is the model's velocity prediction, `t` a timestep of scheduler.timesteps or a batch [B] of
    them. log_prob is averaged over the latent dimensions as ddim_step's is, so DDPO's clip range
    and PRDP's scales mean per-dimension log-densities for both families. Gradient flows into
    x_next and log_prob through the mean only."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before flow_step")
    if scheduler.config.stochastic_sampling or scheduler.config.invert_sigmas:
        raise ValueError("flow_step follows the plain flow schedule; load the scheduler with "
                         "stochastic_sampling=False and invert_sigmas=False")
    if eta == 0 and prev_sample is not None:
        raise ValueError("a log-prob needs a stochastic step: eta=0 has zero variance; sample with eta > 0")
    shape = (-1, *[1] * (x_t.ndim - 1))
    # the step's index in the schedule, per sample (t may mix timesteps, as ddim_step's may)
    timesteps = scheduler.timesteps.to(x_t.device)
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    gap, i = (timesteps[None, :] - t[:, None].to(timesteps.dtype)).abs().min(dim=1)
    if gap.max() > 1e-3:  # (one sync a step) a timestep of another schedule would take wrong sigmas silently
        raise ValueError(f"timestep {t[gap.argmax()].item()} is not in the scheduler's {len(timesteps)}-step "
                         "schedule; call scheduler.set_timesteps(num_steps) with the rollout's num_steps")
    sigmas = scheduler.sigmas.to(x_t.device, x_t.dtype)
    s, s_next = sigmas[i].reshape(shape), sigmas[i + 1].reshape(shape)
    ds = s_next - s  # < 0
    v = v.to(x_t.dtype)
    # g(s) = a sqrt(s / (1 - s)) is infinite at s = 1, where sampling starts: there 1 - s is taken as
    # 1 - sigmas[1], the next step's, so the first step's noise is the second's (the reference code
    # of Flow-GRPO, yifan123/flow_grpo, does the same)
    g = eta * (s / torch.maximum(1 - s, 1 - sigmas[1])).sqrt()
    mean = x_t + ds * (v + g ** 2 / (2 * s) * (x_t + (1 - s) * v))  # (F5); eta = 0: (F2)
    if eta == 0:
        return mean, None
    std = g * (-ds).sqrt()
    if prev_sample is None:
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor
            noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = mean + std * noise.to(x_t.device, x_t.dtype)
    # as in ddim_step: the sample is held fixed, the policy gradient flows through the mean; averaged
    # over the latent dimensions (a sum over SD 3.5's 16x128x128 would overflow PPO's ratio)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim)))


def is_flow(scheduler):
    """Whether the model is a flow-matching one (SD 3.5), sampled with flow_step, not ddim_step."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # diffusers is loaded already: a pipeline exists
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def step(scheduler, out, t, x_t, eta, prev_sample=None, generator=None, noise=None):
    """One denoising step with its log-prob, chosen by the model: flow_step for a flow-matching
    scheduler (SD 3.5), ddim_step otherwise (SD 1.5, SDXL, the shapes world). Same arguments, same
    contract; `eta` is the step's noise knob in both (DDIM's eta, Flow-GRPO's noise level)."""
    fn = flow_step if is_flow(scheduler) else ddim_step
    return fn(scheduler, out, t, x_t, eta, prev_sample=prev_sample, generator=generator, noise=noise)


# --------------------------------------------------------------------------------------------
# The denoising loop: one for the CLI and both trainers

@dataclass
class Trajectory:
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T]: log p(x_{t_prev} | x_t) of each step; None when eta == 0
    timesteps: torch.Tensor  # [T]
    guidance: torch.Tensor  # [T]: the CFG scale used at each step
    cond: torch.Tensor  # [B, L, D] (SDXL: a dict, see above): the prompts' record used (weighted, if exploring)
    uncond: torch.Tensor  # [B, L, D] (SDXL: a dict): the unconditional record used
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], or None (decode=False)
    eta: float


def decode_latents(pipe, latents):
    """VAE-decode latents to images in [0, 1] (differentiable; the clamp is the pipeline's too). SD 3.5's
    VAE also shifts its latents (shift_factor; SD 1.5's and SDXL's have none)."""
    z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0)
    images = pipe.vae.decode(z).sample
    return (images.to(latents.dtype) / 2 + 0.5).clamp(0, 1)  # fp16 VAE -> the latents' fp32


def rollout(pipe, cond, uncond, guidance, num_steps=20, eta=1.0, latents=None, generator=None,
            grad_steps=0, checkpoint=False, decode=True, noise=None, unet_batch=None):
    """Denoise from noise with CFG and DDIM, or the flow step for SD 3.5 (`step`); return the whole
    Trajectory. `eta` is the step's noise knob: DDIM's eta, or Flow-GRPO's noise level (flow_step).

    guidance: a float, or a Tensor[num_steps] of per-step scales (explore.cfg_schedule).
    cond / uncond: per-sample conditioning records, [B, L, D] or SDXL's or SD 3.5's dicts (uncond may
    have 1 row).
    grad_steps=K: only the last K UNet calls (and the VAE decode) run with autograd, as AlignProp
    and DRaFT-K need; earlier steps run under no_grad. K=0: nothing keeps a graph (DDPO's sampling).
    checkpoint: recompute each grad-step UNet call in the backward pass (saves GPU memory on SD).
    noise: [num_steps, B, C, H, W], the DDIM steps' noise, drawn beforehand (else from `generator`).
    unet_batch: at most this many samples per UNet call (without gradient). DDPO and PRDP pass their
    training micro-batch: a GPU may pick another kernel, rounding otherwise, for another batch size,
    and the log-probs recorded here must be the ones training recomputes (a bf16 rounding difference
    is far above DDPO's clip range: docs/gpu.md, "DDPO's first ratio under bf16").

    Everything needed to recompute the same log-probs later is recorded (latents, timesteps, the
    scales and embeddings actually used), so DDPO's first PPO ratio is exactly 1 with exploration
    on or off: exploration changes which samples are drawn, never how they are scored.
    """
    unet, scheduler = denoiser(pipe), pipe.scheduler  # the UNet, or SD 3.5's transformer
    dev = unet.device
    cond = to_device(cond, dev)
    uncond = expand(to_device(uncond, dev), num_samples(cond))
    scheduler.set_timesteps(num_steps, device=dev)
    timesteps = scheduler.timesteps
    n = len(timesteps)
    scales = torch.as_tensor(guidance, dtype=torch.float32, device=dev).reshape(-1)
    scales = scales.expand(n).clone() if scales.numel() == 1 else scales
    if scales.numel() != n:
        raise ValueError(f"guidance has {scales.numel()} scales for {n} steps; pass one float or one per step")
    if not 0 <= grad_steps <= n:
        raise ValueError(f"grad_steps={grad_steps} must be between 0 and num_steps={n}")
    if latents is None:
        latents = initial_noise(pipe, num_samples(cond), generator)
    # fp32 latents whatever the UNet computes in (plumbing/mixed_precision.py; float64 in a gradient check), unscaled:
    # DDIM's init_noise_sigma is 1 and its scale_model_input the identity; the flow scheduler has neither
    x = latents.to(dev, torch.promote_types(unet.dtype, torch.float32))
    xs, log_probs = [x], []
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= n - grad_steps):
            if checkpoint and torch.is_grad_enabled():
                eps = torch.utils.checkpoint.checkpoint(guided_eps, unet, x, t, cond, uncond, scales[i],
                                                        use_reentrant=False)
            else:
                k = unet_batch or len(x)
                eps = torch.cat([guided_eps(unet, x[j:j + k], t, index(cond, slice(j, j + k)),
                                            index(uncond, slice(j, j + k)), scales[i])
                                 for j in range(0, len(x), k)])
            x, log_prob = step(scheduler, eps, t, x, eta, generator=generator, noise=None if noise is None else noise[i])
        xs.append(x)
        log_probs.append(log_prob)
    with torch.set_grad_enabled(grad_steps > 0):
        images = decode_latents(pipe, x) if decode else None
    return Trajectory(latents=torch.stack(xs, dim=1), log_probs=None if eta == 0 else torch.stack(log_probs, dim=1),
                      timesteps=timesteps, guidance=scales, cond=cond, uncond=uncond, images=images, eta=eta)


def replay(unet, scheduler, data, timesteps, eta, batch_size, weights=None):
    """The log-prob [n, T] of every recorded step x_t -> x_{t-1} under the UNet as it is now, with the
    guidance scale and prompt embedding that drew it (`data`: rollout's latents, log_probs, cond, uncond,
    scale [n, T]); PRDP scores its samples under p_ref and theta with it. With `weights` [n, T], also
    back-propagate sum(weights * log-probs) into the LoRA's .grad, one step of one micro-batch at a time:
    only that small graph is ever held, never the T steps of all trajectories (as train_ddpo.py trains)."""
    n, T = data["log_probs"].shape
    log_probs = torch.empty_like(data["log_probs"])
    for a in range(0, n, batch_size):
        i = slice(a, a + batch_size)
        for s in range(T):
            with torch.set_grad_enabled(weights is not None):
                x_t, x_prev = data["latents"][i, s], data["latents"][i, s + 1]
                cond, uncond = index(data["cond"], i), index(data["uncond"], i)
                eps = guided_eps(unet, x_t, timesteps[s], cond, uncond, data["scale"][i, s])
                _, lp = step(scheduler, eps, timesteps[s], x_t, eta, prev_sample=x_prev)
                if weights is not None:
                    (weights[i, s] * lp).sum().backward()
            log_probs[i, s] = lp.detach()
    return log_probs


def seeded_generator(seed, *keys):
    """A CPU generator seeded from a run seed and a few integers (epoch, batch, rank, ...): the same
    keys give the same numbers whatever the process count, and after a resume."""
    s = seed
    for k in keys:
        s = (s * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


STREAMS = ("noise", "ddim", "prompts", "weights")


def random_streams(seed, *keys):
    """One generator per random quantity of a sampling batch, each seeded from (seed, purpose,
    *keys): the initial noise, the DDIM noise, the prompt choice and DiffExp's prompt weights.
    Common random numbers: two runs with the same seed draw the same prompts from the same initial
    noise whether they explore or not, so they differ only in what exploring changes."""
    return {name: seeded_generator(seed, purpose, *keys) for purpose, name in enumerate(STREAMS, 1)}


def initial_noise(pipe, n, generator=None):
    """x_T for n samples: standard normal latents of the UNet's (or transformer's) shape (drawn on the CPU)."""
    unet = denoiser(pipe)
    size = unet.config.sample_size
    return torch.randn((n, unet.config.in_channels, size, size), generator=generator,
                       device=generator.device if generator is not None else "cpu")
