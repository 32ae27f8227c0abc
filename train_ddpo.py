"""DDPO with DiffExp exploration, top to bottom.

DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024) treats the
DDIM denoising chain as a T-step decision process: each step x_t -> x_{t-1} is a Gaussian policy
whose mean is the UNet's, so a sampled image has an exact log-likelihood, and the reward of the
final image can be maximised with a policy gradient. Each epoch:

    1. sample     images with the current model, recording every step of every chain
    2. reward     score them (one reward query per image)
    3. advantages normalise the rewards per prompt
    4. train      PPO's clipped importance-sampled objective over the recorded steps (LoRA only)

Fail-safe: a NaN or infinite reward, sample, loss or gradient skips the update it would feed, with
a warning; --max_skips in a row stop the run, and a checkpoint with a non-finite weight is never
written (plumbing/runs.py), so the last good one is always there to resume from.

DiffExp (Chae et al., "DiffExp: Efficient Exploration in Reward Fine-tuning for Text-to-Image
Diffusion Models", AAAI 2025, Sec. 3) changes only step 1, and only for the first 3/4 of training:
a very low CFG scale for the early, noisy timesteps (t > t_thres), and a random up-weighting of one
phrase of each prompt.

    python train_ddpo.py --explore                      # shapes world, CPU, minutes
    python train_ddpo.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --reward=aesthetic \\
        --prompts=animals ...                           # the paper's setting (docs/gpu.md)
    torchrun --nproc_per_node=2 train_ddpo.py ...       # several processes (DDP)
"""
from collections import defaultdict

import torch
from tqdm import tqdm

import lora
import sampling
from plumbing import compiling, configurator, distributed, lifecycle, mixed_precision
from explore import cfg_schedule, draw_weights, explore_active, parse_phrases  # DiffExp (explore.py)
from plumbing.configurator import at_least, positive, require  # the input checks

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python train_ddpo.py --help` lists them)
# (the model, run, logging and hardware knobs repeat in each trainer, deliberately: each file shows all it takes)
# what to train
model = "shapes"             # 'shapes' (offline world), a hub id, or a local diffusers folder
revision = ""                # hub --model only: a branch, tag or commit to pin its weights to ("" = main)
variant = ""                 # weight files of this variant, e.g. fp16 (*.fp16.safetensors); "" = the plain ones
t5 = True                    # SD 3.5 only: load its T5 encoder (--no-t5: zeros for T5's tokens, GBs less memory)
reward = "shapes_aesthetic"  # rewards.py name: shapes_aesthetic, shapes_alignment, aesthetic, pickscore, jpeg_...
prompts = "shapes"           # prompt set (shapes, animals, animal_activities, ...) or a text file
reward_options = ""          # extra rewards.load options, "key=value,key=value" (e.g. mlp_path=...)
out = ""                     # run folder; default out/ddpo-<reward>[-explore]-s<seed>
seed = 0                     # seeds sampling noise, prompts and shuffling; same seed = same run
# sampling (DDPO paper, Appendix: 50 DDIM steps, eta 1, guidance 5 on SD 1.5)
num_steps = 10               # DDIM steps per image (the shapes world's first command: 10, so it trains in minutes)
eta = 1.0                    # DDIM noise, in (0, 1]: > 0 so every step has a log-likelihood (above 1: NaN)
guidance = 5.0               # classifier-free guidance scale (DiffExp's w_high)
# DiffExp exploration (Chae et al. 2025, Sec. 3)
explore = False              # explore during the first explore_frac of the epochs
explore_frac = 0.75          # fraction of training that explores (paper: 3/4)
w_low = 1.0                  # CFG scale for t > t_thres: 1 = the conditional model unguided, 0 = the unconditional
t_thres = 800                # timestep threshold of the CFG schedule (paper: 900, 800 or 700)
weight_max = 1.2             # prompt weighting: one phrase up-weighted by w ~ U(1, weight_max)
explore_cfg = True           # ablation: use the dynamic CFG schedule when exploring
explore_weights = True       # ablation: use random prompt weighting when exploring
# Defaults: the first command's, 50 epochs in ~5 min on 2 CPU cores (docs/results.md); the paper's: docs/gpu.md
# batches (per process; a torchrun run multiplies the samples per epoch by the world size)
epochs = 50                  # number of sample-then-train rounds (50 x 64 = 3,200 reward queries)
sample_batch_size = 16       # images per sampling call
num_batches = 4              # sampling calls per epoch
samples_per_prompt = 16      # images per drawn prompt in a sampling call: several, so each prompt's statistics are its own
train_batch_size = 16        # samples per training micro-batch
grad_accum = 1               # micro-batches per optimizer step (each over all trained timesteps)
inner_epochs = 1             # passes over each epoch's samples
timestep_fraction = 0.5      # fraction of each chain's steps trained on (DDPO on SD 1.5: 1.0)
# policy gradient (DDPO Sec. 4.3 and its released hyper-parameters)
clip_range = 3e-3            # PPO clip range on the per-step likelihood ratio (DDPO on SD 1.5: 1e-4)
adv_clip = 5.0               # advantages clipped to +-adv_clip
per_prompt_stats = True      # normalise rewards per prompt (running buffer) rather than per batch
stat_buffer = 32             # rewards kept per prompt
stat_min_count = 8           # below this many, a prompt uses the whole batch's statistics (DDPO: 16)
kl_beta = 0.0                # KL penalty to the pretrained model per trained step (Flow-GRPO's beta; 0 = DDPO's, off)
# optimisation
lr = 3e-3                    # AdamW learning rate on the LoRA weights (DDPO on SD 1.5: 3e-4)
weight_decay = 1e-4          # AdamW weight decay
max_grad_norm = 1.0          # gradient-norm clip
lora_rank = 4                # LoRA rank (alpha = rank)
# evaluation and logging
eval_every = 10              # epochs between evaluations (plain sampling, fixed prompts and seeds)
eval_prompts = 16            # prompts in the evaluation grid
eval_seeds = 4               # images per evaluation prompt
eval_batch_size = 16         # evaluation images sampled, decoded and scored at a time (memory only; may change on resume)
wandb_log = False            # also log each epoch to Weights & Biases (WANDB_MODE=offline: no network needed)
wandb_project = "diffexp"    # its W&B project
wandb_run_name = ""          # its W&B run name; "" = the run folder's name
tensorboard = False          # also write TensorBoard event files to <out>/tensorboard
stop_after = 0               # stop after this many epochs in this invocation (0 = never); re-run to resume
max_skips = 3                # a NaN/inf reward, sample, loss or gradient skips its update; this many in a row stop the run
# hardware
device = "auto"              # auto (cuda if there is a GPU), cpu, cuda or cuda:N
precision = "auto"           # UNet arithmetic: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16 (plumbing/mixed_precision.py)
compile = "auto"             # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)
# ------------------------------------------------------------------------------------------------


def per_prompt_advantages(prompt_list, r, buffers, stat_buffer, stat_min_count):
    """DDPO's per-prompt reward normalisation (Black et al., Sec. 4.3 / their stat tracker).

    Each prompt keeps a running buffer of its last `stat_buffer` rewards; its advantage is the
    reward standardised by that buffer's mean and std, so an easy prompt that always scores high
    is not reinforced just for being easy. Until a prompt has `stat_min_count` rewards, the whole
    batch's statistics are used. The std is the population std (np.std, as ddpo-pytorch's
    PerPromptStatTracker and TRL compute it), not the unbiased one. `buffers` (prompt -> list of
    floats) is updated in place."""
    adv = torch.empty_like(r)
    for p in dict.fromkeys(prompt_list):  # unique, in order
        mask = torch.tensor([q == p for q in prompt_list])
        buffers[p] = (buffers[p] + r[mask].tolist())[-stat_buffer:]
        if len(buffers[p]) < stat_min_count:
            mean, std = r.mean(), r.std(correction=0)
        else:
            b = torch.tensor(buffers[p], dtype=r.dtype)
            mean, std = b.mean(), b.std(correction=0)
        adv[mask] = (r[mask] - mean) / (std + 1e-6)
    return adv


def ppo_loss(log_prob, old_log_prob, adv, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised, and two
    diagnostics: approximate KL between the old and new step policies, and the clipped fraction."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clipfrac.detach(), ratio.detach()


def kl_to_pretrained(scheduler, out, out_ref, t, x_t, eta):
    """KL(policy step || pretrained step) per sample, Flow-GRPO's penalty (Liu et al. 2025, weight beta).
    Two Gaussians of one std: KL = |mean - mean_ref|^2 / (2 std^2) = log p_ref(mean_ref) - log p(mean_ref),
    mean_ref being the zero-noise step; averaged over the latent dimensions as the log-probs are."""
    mean_ref, _ = sampling.step(scheduler, out_ref, t, x_t, eta, noise=torch.zeros_like(x_t))
    _, at_ref = sampling.step(scheduler, out_ref, t, x_t, eta, prev_sample=mean_ref)
    _, at_policy = sampling.step(scheduler, out, t, x_t, eta, prev_sample=mean_ref)
    return at_ref - at_policy


def check_options():
    """This trainer's own input checks, one line each on failure (lifecycle.check has the ones
    every trainer shares)."""
    at_least(1, sample_batch_size=sample_batch_size, num_batches=num_batches, samples_per_prompt=samples_per_prompt,
             train_batch_size=train_batch_size, grad_accum=grad_accum, inner_epochs=inner_epochs,
             stat_buffer=stat_buffer)
    positive(clip_range=clip_range, adv_clip=adv_clip)
    require(kl_beta >= 0, f"--kl_beta must be >= 0 (a weight on the KL to the pretrained model), got {kl_beta}")
    require(0 < eta <= 1, f"--eta must be in (0, 1], got {eta}: with eta=0 DDIM is deterministic and a step has no "
                          "likelihood for the policy gradient, above 1 its variance outgrows the step (NaN samples); "
                          "DDPO uses eta=1.0 (Flow-GRPO's noise level on SD 3.5: 0.7)")
    require(0 < timestep_fraction <= 1, f"--timestep_fraction must be in (0, 1], got {timestep_fraction}")
    require(sample_batch_size % samples_per_prompt == 0,
            f"--samples_per_prompt={samples_per_prompt} must divide --sample_batch_size={sample_batch_size}")
    samples_per_epoch = sample_batch_size * num_batches
    require(samples_per_epoch >= 2, f"sample_batch_size*num_batches = {samples_per_epoch}: the advantages are "
                                    "rewards standardised over the epoch's samples, which needs at least 2")
    require(samples_per_epoch % (train_batch_size * grad_accum) == 0,
            f"samples per epoch (sample_batch_size*num_batches = {samples_per_epoch}) must be a multiple of "
            f"train_batch_size*grad_accum = {train_batch_size * grad_accum}")
    require(2 <= stat_min_count <= stat_buffer, f"--stat_min_count must be between 2 and --stat_buffer={stat_buffer}, "
                                                f"got {stat_min_count}: the std of one reward is 0, and a prompt's "
                                                "buffer never holds more than stat_buffer")


def main(check_only=False, observer=None):
    # ---- checks first: bad input costs nothing -------------------------------------------------
    # (check_only: experiments/compare.py and experiments/bench.py check the options they pass on)
    prompt_list = lifecycle.check(config)  # the checks every trainer shares (plumbing/lifecycle.py)
    check_options()  # and this one's own
    if check_only:
        return

    # ---- the run: folder, processes, model and reward, dashboards, fail-safe (plumbing/lifecycle.py) --
    run = lifecycle.start("ddpo", config, prompt_list, observer)
    rank, world, dev, master = run.rank, run.world, run.dev, run.master
    pipe, reward_fn, skips = run.pipe, run.reward_fn, run.skips
    unet, scheduler = sampling.denoiser(pipe), pipe.scheduler  # the UNet, or SD 3.5's transformer
    torch.manual_seed(seed)  # LoRA's A is drawn from the global generator
    params = lora.inject(unet, rank=lora_rank)
    compiling.unet(unet, compile, dev, replays=True)  # after the LoRA layers are in: they are part of the graph
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = mixed_precision.grad_scaler(unet)  # fp16 only: loss scaling; with bf16 and fp32 it does nothing
    scheduler.set_timesteps(num_steps, device=dev)
    timesteps = scheduler.timesteps
    num_train_steps = max(1, int(num_steps * timestep_fraction))
    uncond_one = sampling.unconditional(pipe)  # one row: rollout expands it to the batch

    # ---- resume: the checkpoint holds everything the next epoch depends on ---------------------
    buffers = defaultdict(list)  # each prompt's recent rewards (per_prompt_advantages)
    if ck := run.resume(unet, optimizer):  # from the run's checkpoint, if it has one
        buffers.update(ck["buffers"])

    for epoch in run.epochs():  # (the evaluation before any update, at epoch 0)
        exploring = explore and explore_active(epoch, epochs, explore_frac)
        if explore and not exploring and explore_active(epoch - 1, epochs, explore_frac):
            buffers.clear()  # exploration just ended: its samples' rewards are a lower baseline than plain sampling's

        # ---- 1. sample (as train_prdp.py's step 1, deliberately: DiffExp enters each trainer here) --
        unet.eval()
        batches = []
        for b in tqdm(range(num_batches), desc=f"epoch {epoch} sampling", disable=not master, leave=False):
            rng = sampling.random_streams(seed, epoch, b * world + rank)  # its own streams per process and batch
            idx = torch.randint(len(prompt_list), (sample_batch_size // samples_per_prompt,), generator=rng["prompts"])
            idx = idx.repeat_interleave(samples_per_prompt)
            batch_prompts = [prompt_list[i] for i in idx]
            weights = None
            if exploring and explore_weights:  # DiffExp random prompt weighting, drawn afresh
                weights = draw_weights(batch_prompts, rng["weights"], w_max=weight_max)
            cond = sampling.encode_prompts(pipe, batch_prompts, weights)
            scale = torch.full((num_steps,), guidance)
            if exploring and explore_cfg:  # DiffExp dynamic CFG: w_low while t > t_thres
                scale = cfg_schedule(scheduler, guidance, w_low, t_thres).cpu()
            with torch.no_grad():
                x_T = sampling.initial_noise(pipe, len(idx), rng["noise"])
                traj = sampling.rollout(pipe, cond, uncond_one, scale.to(dev), num_steps=num_steps, eta=eta,
                                        latents=x_T, generator=rng["ddim"],
                                        unet_batch=train_batch_size)  # UNet calls shaped as training's
            # ---- 2. reward (prompts are scored without their phrase marks) -----------------------
            clean = [parse_phrases(p)[0] for p in batch_prompts]
            with torch.no_grad():
                r = reward_fn(traj.images, clean).float().cpu()
            # a NaN chain can still score a finite reward (a JPEG of NaN pixels has a size): check the chain too
            chain_ok = torch.isfinite(traj.latents).flatten(1).all(1) & torch.isfinite(traj.log_probs).all(1)
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond,
                                uncond=traj.uncond, scale=traj.guidance.expand(len(idx), -1),
                                rewards=r, chain_ok=chain_ok.float().cpu(), idx=idx))
        local = {k: sampling.cat([b[k] for b in batches]) for k in batches[0]}  # cat: also conditioning records
        n_local = len(local["rewards"])
        n_updates = inner_epochs * n_local // (train_batch_size * grad_accum)  # optimizer steps per epoch

        # gather every process's rewards and prompts: statistics are over the global batch
        all_r, all_ok, all_idx = (distributed.gather(local[k].to(dev)).cpu() for k in ("rewards", "chain_ok", "idx"))
        all_prompts = [prompt_list[i] for i in all_idx]
        run.queries += len(all_r)
        good = run.good_samples(all_r, all_ok > 0, all_prompts, epoch)  # the fail-safe: NaN or inf, no update
        samples_ok = bool(good.all())
        skipped = 0 if samples_ok else n_updates

        # ---- 3. advantages -------------------------------------------------------------------------
        # keyed by the unweighted prompt text: exploration changes the embedding, not the task
        if not samples_ok:
            adv = None
        elif per_prompt_stats:
            adv = per_prompt_advantages(all_prompts, all_r, buffers, stat_buffer, stat_min_count)
        else:
            adv = (all_r - all_r.mean()) / (all_r.std(correction=0) + 1e-6)
        if adv is not None:
            adv = adv.clamp(-adv_clip, adv_clip)[rank * n_local:(rank + 1) * n_local].to(dev)

        # ---- 4. train: PPO over the recorded denoising steps --------------------------------------
        # The log-prob of each recorded step is recomputed with the guidance scale and the prompt
        # embedding that were used when it was sampled (weighted ones, if exploring). The policy
        # being improved is therefore exactly the one that drew the samples, and the likelihood
        # ratio is 1 on the first inner step, with or without exploration (logged as ratio_dev).
        unet.train()
        stats = defaultdict(list)
        first_step = True
        for inner in range(inner_epochs if samples_ok else 0):
            perm = torch.randperm(n_local, generator=sampling.seeded_generator(seed, epoch, 10_000 + inner, rank))
            # each sample's own random steps (as DDPO shuffles them), keyed by its place in the global batch
            step_order = torch.stack([torch.randperm(num_steps, generator=sampling.seeded_generator(
                seed, epoch, 20_000 + inner, rank * n_local + k)) for k in range(n_local)])[:, :num_train_steps]
            micro_batches = range(n_local // train_batch_size)
            for m in tqdm(micro_batches, desc=f"epoch {epoch} training", disable=not master, leave=False):
                i = perm[m * train_batch_size:(m + 1) * train_batch_size]
                for j in range(num_train_steps):
                    s = step_order[i, j]
                    x_t, x_prev = local["latents"][i, s], local["latents"][i, s + 1]
                    t, w = timesteps[s], local["scale"][i, s]
                    cond, uncond = sampling.index(local["cond"], i), sampling.index(local["uncond"], i)
                    eps = sampling.guided_eps(unet, x_t, t, cond, uncond, w)
                    _, log_prob = sampling.step(scheduler, eps, t, x_t, eta, prev_sample=x_prev)
                    loss, kl, clipfrac, ratio = ppo_loss(log_prob, local["log_probs"][i, s], adv[i], clip_range)
                    if kl_beta > 0:  # Flow-GRPO's KL to the pretrained model (the LoRA switched off)
                        with torch.no_grad(), lora.disabled(unet):
                            eps_ref = sampling.guided_eps(unet, x_t, t, cond, uncond, w)
                        kl_ref = kl_to_pretrained(scheduler, eps, eps_ref, t, x_t, eta).mean()
                        loss = loss + kl_beta * kl_ref
                        stats["kl_ref"].append(kl_ref.item())
                    scaler.scale(loss / (num_train_steps * grad_accum)).backward()
                    stats["loss"].append(loss.item())
                    stats["approx_kl"].append(kl.item())
                    stats["clipfrac"].append(clipfrac.item())
                    if first_step:
                        stats["ratio_dev"].append((ratio - 1).abs().max().item())
                if (m + 1) % grad_accum == 0:
                    distributed.average_gradients(params)  # over the processes, what DDP would do (alone: nothing)
                    scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping
                    gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    if torch.isfinite(gn):  # the same on every process: the gradients are averaged
                        scaler.step(optimizer)
                        skips.ok()
                        stats["grad_norm"].append(gn.item())
                    else:  # the fail-safe: a NaN or inf loss or gradient never reaches the weights
                        skipped += 1
                        done = perm[(m + 1 - grad_accum) * train_batch_size:(m + 1) * train_batch_size]
                        if not mixed_precision.backing_off(scaler):  # fp16's loss scale too high is no fault
                            skips.skip(f"non-finite loss or gradient (gradient norm {gn.item()}) in epoch {epoch}",
                                       prompts=[prompt_list[k] for k in local["idx"][done]])
                    scaler.update()  # fp16: halve the loss scale after an overflow, grow it after a while without
                    optimizer.zero_grad(set_to_none=True)
                    first_step = False

        # ---- log, evaluate, checkpoint (plumbing/lifecycle.py) -------------------------------------
        diagnostics = {k: lifecycle.finite_mean(stats[k]) for k in ("loss", "approx_kl", "clipfrac", "grad_norm", "kl_ref")
                       if k != "kl_ref" or kl_beta > 0}
        diagnostics["ratio_dev"] = max(stats["ratio_dev"], default=float("nan"))
        run.end_epoch(epoch, exploring, all_r[good], skipped, diagnostics,  # a skipped sample's reward: NaN
                      f"kl {diagnostics['approx_kl']:.2e} | clipfrac {diagnostics['clipfrac']:.3f} | "
                      f"ratio-1 {diagnostics['ratio_dev']:.1e}",
                      checkpoint=dict(lora=lora.state_dict(unet), optimizer=optimizer.state_dict(), buffers=dict(buffers)))

    run.finish(lambda folder: lora.save(unet, folder))


if __name__ == "__main__":
    config = configurator.configure(globals())
    main()
