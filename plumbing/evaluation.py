"""The plain-sampling evaluation and the image grids: what the trainers, sample.py and the
experiments sample to look at a model, not to train it.

    from plumbing import evaluation
    evaluation.evaluate(pipe, reward_fn, prompts, guidance=5.0, num_steps=20, eta=1.0, per_prompt=4)
    evaluation.sample_grid(pipe, prompts, seeds=[0, 1, 2, 3], guidance=5.0, steps=20)  # [P, S, 3, H, W]

Both sample with sampling.rollout; evaluate shares its images out over the ranks under torchrun.
It lives with the plumbing, in the lifecycle layer: it calls the sampling loop, as plumbing/lifecycle.py does.
"""
import torch

import explore
import sampling
from plumbing import distributed, grids


@torch.no_grad()
def evaluate(pipe, reward_fn, prompts, guidance, num_steps, eta, per_prompt, path=None, title="", batch_size=16):
    """The trainers' evaluation: every prompt `per_prompt` times, sampled plainly (constant
    guidance, unweighted prompts) from fixed noise, so every epoch and every run sees the same
    starting points. Scores the images and, if `path`, writes their grid. Returns the mean reward.

    The images are sampled, decoded and scored `batch_size` at a time, so the memory is one
    micro-batch's whatever the number of images (SD 1.5's VAE decode alone takes about 0.6 GB an
    image in bf16: docs/gpu.md, GPU memory). All the noise is drawn first, in the order one batch of all the images would draw it, so
    the numbers do not depend on batch_size beyond the kernels' rounding.

    Under torchrun every rank must call it: the micro-batches are dealt out to the ranks in turn
    (rank r samples batches r, r + N, r + 2N, ...) and put together on every rank, so the numbers are
    exactly one process's (the same batches of the same noise) and no rank waits in a collective while
    another evaluates alone. Rank 0 alone evaluating would outlast NCCL's 10-minute timeout on an SDXL
    recipe (64 images at 1024 px, 50 steps, on a slower card) and end the run at its first evaluation."""
    todo = [p for p in prompts for _ in range(per_prompt)]
    clean = [explore.parse_phrases(p)[0] for p in todo]
    g = torch.Generator().manual_seed(1234)
    x_T = sampling.initial_noise(pipe, len(todo), g)
    noise = torch.stack([torch.randn(x_T.shape, generator=g) for _ in range(num_steps)]) if eta > 0 else None
    uncond = sampling.unconditional(pipe)
    rank, world = distributed.rank_and_world()
    size = x_T.shape[-1] * pipe.vae_scale_factor
    r, images = torch.zeros(len(todo)), torch.zeros(len(todo) if path else 0, 3, size, size)  # this rank fills its part
    for a in range(rank * batch_size, len(todo), world * batch_size):
        i = slice(a, a + batch_size)
        traj = sampling.rollout(pipe, sampling.encode_prompts(pipe, todo[i]), uncond, guidance, num_steps=num_steps,
                                eta=eta, latents=x_T[i], noise=None if noise is None else noise[:, i])
        r[i] = reward_fn(traj.images, clean[i]).float().cpu()
        if path:
            images[i] = traj.images.float().cpu()
    r, images = distributed.assemble(r), distributed.assemble(images)
    if path and rank == 0:
        grids.save_grid(images, clean[::per_prompt], path, titles=[title])
    return r.mean().item()


def sample_grid(pipe, prompt_list, seeds, guidance, steps, eta=0.0, exploring=False, w_low=1.0,
                t_thres=800, seed=0, batch_size=16, explore_cfg=True, explore_weights=True, weight_max=1.2):
    """Images [P, S, 3, H, W]: every prompt with every seed's initial noise, plainly or exploring
    (DiffExp's guidance schedule and prompt weights, each switchable as the trainers' ablation
    switches; `seed` seeds the weights and the DDIM noise)."""
    unet = sampling.denoiser(pipe)
    size = unet.config.sample_size
    noise = {s: torch.randn(unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(s))
             for s in seeds}
    pairs = [(p, s) for p in prompt_list for s in seeds]
    weight_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    pipe.scheduler.set_timesteps(steps)
    scales = explore.cfg_schedule(pipe.scheduler, guidance, w_low, t_thres) if exploring and explore_cfg else guidance
    uncond = sampling.unconditional(pipe)
    images = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        texts = [p for p, _ in chunk]
        weights = explore.draw_weights(texts, weight_gen, w_max=weight_max) if exploring and explore_weights else None
        cond = sampling.encode_prompts(pipe, texts, weights)
        traj = sampling.rollout(pipe, cond, uncond, scales, num_steps=steps, eta=eta, generator=noise_gen,
                                latents=torch.stack([noise[s] for _, s in chunk]))
        images.append(traj.images.cpu())
    return torch.cat(images).reshape(len(prompt_list), len(seeds), *images[0].shape[1:])
