"""AlignProp / DRaFT with DiffExp exploration, top to bottom.

When the reward is differentiable, there is no need for a policy gradient: sample an image with the
current model, score it, and back-propagate the reward through the VAE decoder and the sampling
chain into the LoRA weights (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with
Reward Backpropagation" (AlignProp), 2023; Clark et al., "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards" (DRaFT), ICLR 2024). Back-propagating through all T steps costs memory
linear in T, so the gradient is truncated to the last K steps: K=1 is DRaFT-1, K=all is full
back-propagation, and AlignProp draws K at random every step. Each step:

    1. sample     a batch; the first T-K denoising steps without gradient, the last K with it
    2. reward     decode and score the images (one reward query per image)
    3. update     loss = -mean reward (DRaFT-LV: summed over its copies); backward into the LoRA
                  weights; clip; AdamW

Fail-safe: a NaN or infinite reward or gradient skips its update, with a warning; --max_skips in a
row stop the run, and a checkpoint with a non-finite weight is never written (plumbing/runs.py), so the last
good one is always there to resume from.

DiffExp (Chae et al., AAAI 2025, Sec. 3) changes only how step 1 draws the batch, for the first 3/4
of training: a very low CFG scale for the noisy timesteps t > t_thres, and one phrase of each prompt
up-weighted at random.

    python train_alignprop.py --explore                 # shapes world, CPU, minutes
    python train_alignprop.py --truncation=rand         # AlignProp's randomised K
    torchrun --nproc_per_node=2 train_alignprop.py ...  # several processes (DDP)
"""
from collections import defaultdict

import torch
from tqdm import tqdm

import lora
import rewards
import sampling
from plumbing import compiling, configurator, distributed, lifecycle, mixed_precision
from explore import cfg_schedule, draw_weights, explore_active, parse_phrases  # DiffExp (explore.py)
from plumbing.configurator import at_least, between, positive, require  # the input checks

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python train_alignprop.py --help` lists them)
# (the model, run, logging and hardware knobs repeat in each trainer, deliberately: each file shows all it takes)
# what to train
model = "shapes"             # 'shapes' (offline world), a hub id, or a local diffusers folder
revision = ""                # hub --model only: a branch, tag or commit to pin its weights to ("" = main)
variant = ""                 # weight files of this variant, e.g. fp16 (*.fp16.safetensors); "" = the plain ones
t5 = True                    # SD 3.5 only: load its T5 encoder (--no-t5: zeros for T5's tokens, GBs less memory)
reward = "shapes_aesthetic"  # a differentiable rewards.py reward: shapes_aesthetic, aesthetic, pickscore, ...
prompts = "shapes"           # prompt set (shapes, animals, animal_activities, ...) or a text file
reward_options = ""          # extra rewards.load options, "key=value,key=value" (e.g. mlp_path=...)
out = ""                     # run folder; default out/alignprop-<reward>[-explore]-s<seed>
seed = 0                     # seeds sampling noise and prompts; same seed = same run
# sampling
num_steps = 20               # DDIM steps per image
eta = 0.0                    # DDIM noise, in [0, 1] (0 = deterministic DDIM, as DRaFT samples)
guidance = 5.0               # classifier-free guidance scale (DiffExp's w_high)
# truncated back-propagation
truncation = "1"             # K steps with gradient: an integer (1 = DRaFT-1), 'all', or 'rand'
k_min = 1                    # with truncation=rand: K ~ uniform over {k_min, ..., k_max}, drawn every step
k_max = 10                   # with truncation=rand: largest K
draft_lv = 0                 # DRaFT-LV: sum the last step's gradient over n re-noised copies (0 = off; paper: 2);
                             # its K is 1 by definition, so it refuses another --truncation; --checkpointing applies
checkpointing = "auto"       # gradient checkpointing of the UNet calls: auto (on with CUDA), true, false
# DiffExp exploration (Chae et al. 2025, Sec. 3)
explore = False              # explore during the first explore_frac of training
explore_frac = 0.75          # fraction of training that explores (paper: 3/4)
w_low = 1.0                  # CFG scale for t > t_thres: 1 = the conditional model unguided, 0 = the unconditional
t_thres = 800                # timestep threshold of the CFG schedule (paper: 900, 800 or 700)
weight_max = 1.2             # prompt weighting: one phrase up-weighted by w ~ U(1, weight_max)
explore_cfg = True           # ablation: use the dynamic CFG schedule when exploring
explore_weights = True       # ablation: use random prompt weighting when exploring
# batches (per process)
epochs = 20                  # logged rounds of steps_per_epoch updates
steps_per_epoch = 4          # optimizer steps per epoch
batch_size = 8               # images per micro-batch
grad_accum = 1               # micro-batches per optimizer step
# optimisation
lr = 1e-3                    # AdamW learning rate on the LoRA weights
weight_decay = 1e-4          # AdamW weight decay
max_grad_norm = 1.0          # gradient-norm clip
loss_coef = 1.0              # loss = -loss_coef * mean reward
lora_rank = 4                # LoRA rank (alpha = rank)
# evaluation and logging
eval_every = 4               # epochs between evaluations (plain sampling, fixed prompts and seeds)
eval_prompts = 16            # prompts in the evaluation grid
eval_seeds = 4               # images per evaluation prompt
eval_batch_size = 16         # evaluation images sampled, decoded and scored at a time (memory only; may change on resume)
wandb_log = False            # also log each epoch to Weights & Biases (WANDB_MODE=offline: no network needed)
wandb_project = "diffexp"    # its W&B project
wandb_run_name = ""          # its W&B run name; "" = the run folder's name
tensorboard = False          # also write TensorBoard event files to <out>/tensorboard
stop_after = 0               # stop after this many epochs in this invocation (0 = never); re-run to resume
max_skips = 3                # a NaN/inf reward or gradient skips its update; this many in a row stop the run
# hardware
device = "auto"              # auto (cuda if there is a GPU), cpu, cuda or cuda:N
precision = "auto"           # UNet arithmetic: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16 (plumbing/mixed_precision.py)
compile = "auto"             # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)
# ------------------------------------------------------------------------------------------------


def draw_k(g, truncation, num_steps, k_min, k_max):
    """How many of the last denoising steps get gradient this update."""
    if truncation == "all":
        return num_steps
    if truncation == "rand":
        # AlignProp's randomised truncation: a fresh K each update, uniform over {k_min..k_max}
        return int(torch.randint(k_min, k_max + 1, (1,), generator=g))
    return int(truncation)


def draft_lv_images(pipe, traj, cond, uncond, scale, n, g, use_ckpt=False):
    """DRaFT-LV (Clark et al. 2024, Sec. 4.2): lower-variance gradient for the last step. The final
    latent x_0 of a chain sampled without gradient is re-noised to the last timestep n times with
    fresh noise and denoised again with gradient; returns the n copies' images, copy after copy
    (reward_loss sums their rewards). use_ckpt: gradient checkpointing of those n UNet calls."""
    sched, unet = pipe.scheduler, sampling.denoiser(pipe)
    t = sched.timesteps[-1]
    x0 = traj.latents[:, -1].detach()
    images = []
    for _ in range(n):
        noise = torch.randn(x0.shape, generator=g).to(x0)
        # x_0 noised to the last timestep: x_t = sqrt(a) x_0 + sqrt(1 - a) noise; a flow model's (F1): (1 - s) x_0 + s noise
        x_t = sched.scale_noise(x0, t.reshape(1), noise) if sampling.is_flow(sched) else sched.add_noise(x0, noise, t.reshape(1))
        if use_ckpt:
            eps = torch.utils.checkpoint.checkpoint(sampling.guided_eps, unet, x_t, t, cond, uncond, scale[-1],
                                                    use_reentrant=False)
        else:
            eps = sampling.guided_eps(unet, x_t, t, cond, uncond, scale[-1])
        x_prev, _ = sampling.step(sched, eps, t, x_t, 0.0)
        images.append(sampling.decode_latents(pipe, x_prev))
    return torch.cat(images)


def reward_loss(r, copies=0):
    """The loss to descend: minus the batch's mean reward. DRaFT-LV's r holds `copies` rewards per
    image, copy after copy, and its loss SUMS the copies' mean rewards, as its gradient is a sum in
    Clark et al. (2024, arXiv 2309.17400), Algorithm 2: each of the n inner loops adds
    grad_theta r(x_0, c) to one accumulator, and the step uses the total. (A mean would divide the
    gradient by n: the same direction, but a different scale for the gradient-norm clip.)"""
    return -r.reshape(max(copies, 1), -1).mean(1).sum()


def sample_and_score(pipe, reward_fn, prompt_list, uncond_one, k, rng, *, batch_size, num_steps, eta, guidance,
                     scale=None, explore_weights=False, weight_max=1.2, draft_lv=0, use_ckpt=False):
    """Steps 1 and 2: draw a batch of prompts, sample it with gradient through the last k denoising
    steps, decode and score it. Exploring: `scale` is DiffExp's per-step guidance schedule (None:
    constant `guidance`) and `explore_weights` up-weights one phrase of each prompt. `rng`: one
    generator per random quantity (sampling.random_streams). Returns (rewards [B] with their
    graph, the clean prompts)."""
    idx = torch.randint(len(prompt_list), (batch_size,), generator=rng["prompts"])
    batch_prompts = [prompt_list[i] for i in idx]
    weights = None
    if explore_weights:  # DiffExp random prompt weighting
        weights = draw_weights(batch_prompts, rng["weights"], w_max=weight_max)
    cond = sampling.encode_prompts(pipe, batch_prompts, weights)
    pipe.scheduler.set_timesteps(num_steps)
    if scale is None:
        scale = torch.full((num_steps,), guidance)
    scale = scale.to(sampling.denoiser(pipe).device)
    clean = [parse_phrases(p)[0] for p in batch_prompts]
    latents = sampling.initial_noise(pipe, batch_size, rng["noise"])
    if draft_lv:
        traj = sampling.rollout(pipe, cond, uncond_one, scale, num_steps=num_steps, eta=eta, latents=latents,
                                generator=rng["ddim"], grad_steps=0, decode=False)
        images = draft_lv_images(pipe, traj, cond, uncond_one, scale, draft_lv, rng["ddim"], use_ckpt)
        clean = clean * draft_lv
    else:
        traj = sampling.rollout(pipe, cond, uncond_one, scale, num_steps=num_steps, eta=eta, latents=latents,
                                generator=rng["ddim"], grad_steps=k, checkpoint=use_ckpt)
        images = traj.images
    return reward_fn(images, clean), clean


def check_options():
    """This trainer's own input checks, one line each on failure (lifecycle.check has the ones
    every trainer shares)."""
    try:
        rewards.require_differentiable(reward)  # before anything is loaded: suggest DDPO instead
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    at_least(1, steps_per_epoch=steps_per_epoch, batch_size=batch_size, grad_accum=grad_accum)
    at_least(0, draft_lv=draft_lv)
    positive(loss_coef=loss_coef)
    between(0, 1, eta=eta)  # eta above 1: the DDIM step's variance outgrows it (NaN)
    require(truncation in ("all", "rand") or (truncation.isdigit() and 1 <= int(truncation) <= num_steps),
            f"--truncation must be an integer in 1..{num_steps}, 'all' or 'rand', got {truncation!r}")
    require(truncation != "rand" or 1 <= k_min <= k_max <= num_steps,
            f"--truncation=rand needs 1 <= k_min <= k_max <= num_steps, got {k_min}, {k_max}, {num_steps}")
    require(not draft_lv or truncation == "1", f"--draft_lv={draft_lv} back-propagates through the last step only "
                                               f"(K=1), so it cannot take --truncation={truncation}; drop one of them")
    require(configurator.switch(checkpointing) is not None,
            f"--checkpointing must be auto, true or false, got {checkpointing!r}")


def main(check_only=False, observer=None):
    # ---- checks first: bad input costs nothing -------------------------------------------------
    # (check_only: experiments/compare.py and experiments/bench.py check the options they pass on)
    prompt_list = lifecycle.check(config)  # the checks every trainer shares (plumbing/lifecycle.py)
    check_options()  # and this one's own
    if check_only:
        return

    # ---- the run: folder, processes, model and reward, dashboards, fail-safe (plumbing/lifecycle.py) --
    run = lifecycle.start("alignprop", config, prompt_list, observer)
    rank, world, dev, master = run.rank, run.world, run.dev, run.master
    pipe, reward_fn, skips = run.pipe, run.reward_fn, run.skips
    unet = sampling.denoiser(pipe)  # the UNet, or SD 3.5's transformer
    torch.manual_seed(seed)  # LoRA's A is drawn from the global generator
    params = lora.inject(unet, rank=lora_rank)
    compiling.unet(unet, compile, dev)  # after the LoRA layers are in: they are part of the graph
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = mixed_precision.grad_scaler(unet)  # fp16 only: loss scaling; with bf16 and fp32 it does nothing
    use_ckpt = dev.type == "cuda" if configurator.switch(checkpointing) == "auto" else configurator.switch(checkpointing)
    uncond_one = sampling.unconditional(pipe)  # one row: rollout expands it to the batch
    pipe.scheduler.set_timesteps(num_steps)
    schedule = cfg_schedule(pipe.scheduler, guidance, w_low, t_thres).cpu()  # DiffExp: w_low for t > t_thres
    run.resume(unet, optimizer)  # from the run's checkpoint, if it has one

    for epoch in run.epochs():  # (the evaluation before any update, at epoch 0)
        exploring = explore and explore_active(epoch, epochs, explore_frac)
        stats, skipped = defaultdict(list), 0
        unet.train()
        pbar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", disable=not master, leave=False)
        for s in pbar:
            step = epoch * steps_per_epoch + s
            g = sampling.seeded_generator(seed, step, 1_000_000)  # the same K on every rank
            k = draw_k(g, truncation, num_steps, k_min, k_max)
            step_rewards, step_prompts = [], []
            for m in range(grad_accum):
                # ---- 1. sample, with gradient through the last k steps, and 2. reward ----------
                rng = sampling.random_streams(seed, step, m * world + rank)  # its own streams per process
                r, clean = sample_and_score(pipe, reward_fn, prompt_list, uncond_one, k, rng,
                                            batch_size=batch_size, num_steps=num_steps, eta=eta, guidance=guidance,
                                            scale=schedule if exploring and explore_cfg else None,
                                            explore_weights=exploring and explore_weights, weight_max=weight_max,
                                            draft_lv=draft_lv, use_ckpt=use_ckpt)
                # ---- 3. update: ascend the reward (a NaN reward is caught before the step) --------
                loss = loss_coef * reward_loss(r, draft_lv)
                scaler.scale(loss / grad_accum).backward()  # fp16: scaled, so small gradients survive
                step_rewards.append(r.detach().float().cpu())  # with DRaFT-LV, n queries per image
                step_prompts += clean
                stats["loss"].append(loss.item())
            distributed.average_gradients(params)  # over the processes, what DDP would do (alone: nothing)
            scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping
            gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            r_all = distributed.gather(torch.cat(step_rewards).to(dev)).cpu()
            run.queries += len(r_all)
            if torch.isfinite(r_all).all() and torch.isfinite(gn):  # the same on every process
                scaler.step(optimizer)
                skips.ok()
                stats["grad_norm"].append(gn.item())
            else:  # the fail-safe: a NaN or inf reward or gradient never reaches the weights
                skipped += 1
                bad = (~torch.isfinite(r_all)).nonzero().flatten().tolist()
                if bad:  # rank 0's rewards come first in r_all, so the master names its own prompt
                    skips.skip(f"reward {reward} returned {r_all[bad[0]].item()} in epoch {epoch}",
                               prompts=step_prompts[bad[0]:bad[0] + 1])
                elif not mixed_precision.backing_off(scaler):  # fp16's loss scale too high is no fault
                    skips.skip(f"non-finite gradient (norm {gn.item()}) in epoch {epoch}", prompts=step_prompts)
            scaler.update()  # fp16: halve the loss scale after an overflow, grow it after a while without
            optimizer.zero_grad(set_to_none=True)
            stats["rewards"].append(r_all)
            stats["k"].append(k)

        # ---- log, evaluate, checkpoint (plumbing/lifecycle.py) -------------------------------------
        r_epoch = torch.cat(stats["rewards"])
        diagnostics = dict(loss=lifecycle.finite_mean(stats["loss"]), grad_norm=lifecycle.finite_mean(stats["grad_norm"]),
                           k=stats["k"])
        run.end_epoch(epoch, exploring, r_epoch[torch.isfinite(r_epoch)], skipped, diagnostics,
                      f"loss {diagnostics['loss']:.4f} | grad norm {diagnostics['grad_norm']:.3f} | K {stats['k']}",
                      checkpoint=dict(lora=lora.state_dict(unet), optimizer=optimizer.state_dict()))

    run.finish(lambda folder: lora.save(unet, folder))


if __name__ == "__main__":
    config = configurator.configure(globals())
    main()
