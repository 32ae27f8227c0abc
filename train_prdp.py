"""PRDP with DiffExp exploration, top to bottom.

PRDP (Deng et al., "PRDP: Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of
Diffusion Models", CVPR 2024, arXiv:2402.08714) maximises the KL-regularised reward over whole
denoising trajectories, E[r(x0, c)] - beta KL(p_theta || p_ref) (eq. 6), without a policy gradient.
The optimum is p* = p_ref exp(r / beta) / Z(c) (eq. 7), so for two trajectories a, b of the SAME
prompt the intractable Z(c) cancels (eq. 9):

    log p*/p_ref (a) - log p*/p_ref (b) = (r_a - r_b) / beta

PRDP turns this into supervised regression (the RDP objective, eq. 14): the model "predicts" the
reward difference of two images of one prompt with the left side (theta in place of *), and is
trained onto the observed right side; the model with zero loss is the RL optimum (App. A.3).
p_ref is the PRETRAINED model: here the same UNet with its LoRA switched off. Each epoch
(Algorithm 1, with the proximal update of Sec. 3.3):

    1. sample     N prompts x B images with the current model, recording every step (as DDPO does)
    2. reward     score the images (one reward query per image)
    3. reference  every recorded step's log-prob under the pretrained model
    4. train      K full-batch updates of the pairwise regression, each step's log-ratio clipped to
                  within eps of the sampling model's, the larger of the clipped and unclipped errors

Fail-safe: a NaN or infinite reward, sample, reference log-prob or gradient skips the update it
would feed, with a warning; --max_skips in a row stop the run, and a checkpoint with a non-finite
weight is never written (plumbing/runs.py), so the last good one is always there to resume from.

DiffExp (Chae et al., "DiffExp: Efficient Exploration in Reward Fine-tuning for Text-to-Image
Diffusion Models", AAAI 2025, Sec. 3) changes only step 1, and only for the first 3/4 of training,
exactly as in train_ddpo.py.

    python train_prdp.py --explore                      # shapes world, CPU
    python train_prdp.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --reward=aesthetic \\
        --prompts=animals ...                           # the paper's setting (docs/gpu.md)
    torchrun --nproc_per_node=2 train_prdp.py ...       # several processes (DDP)
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
# defaults (override with --key=value; `python train_prdp.py --help` lists them)
# (the model, run, logging and hardware knobs repeat in each trainer, deliberately: each file shows all it takes)
# what to train
model = "shapes"             # 'shapes' (offline world), a hub id, or a local diffusers folder
revision = ""                # hub --model only: a branch, tag or commit to pin its weights to ("" = main)
variant = ""                 # weight files of this variant, e.g. fp16 (*.fp16.safetensors); "" = the plain ones
t5 = True                    # SD 3.5 only: load its T5 encoder (--no-t5: zeros for T5's tokens, GBs less memory)
reward = "shapes_aesthetic"  # rewards.py name: shapes_aesthetic, shapes_alignment, aesthetic, pickscore, jpeg_...
prompts = "shapes"           # prompt set (shapes, animals, animal_activities, ...) or a text file
reward_options = ""          # extra rewards.load options, "key=value,key=value" (e.g. mlp_path=...)
out = ""                     # run folder; default out/prdp-<reward>[-explore]-s<seed>
seed = 0                     # seeds sampling noise, prompts and prompt weights; same seed = same run
# sampling (PRDP on SD 1.4: 50 DDPM steps, guidance 5; DDIM with eta 1 is DDPM's step)
num_steps = 20               # DDIM steps per image
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
# batches (per process; a torchrun run multiplies the prompts per epoch by the world size)
epochs = 48                  # sample-then-train rounds; 48 x 64 = 3,072 reward queries (DDPO's default: 3,200)
prompts_per_epoch = 8        # N: prompts drawn per epoch (Algorithm 1; paper, small scale: 32)
images_per_prompt = 8        # B: images per prompt; every pair of them is a training pair (paper: 16)
sample_batch_size = 16       # images per sampling call: whole prompt groups, a multiple of images_per_prompt
train_batch_size = 16        # trajectories per UNet call when replaying recorded steps (memory, not maths)
# PRDP (Deng et al. 2024, Sec. 3.1 and 3.3; their settings on SD 1.4 in App. E, Table 4)
updates_per_epoch = 2        # K: full-batch updates per epoch; 2 is the fewest at which the clip acts (paper: 10 / 1)
beta = 100.0                 # KL weight: the targets are (r_i - r_j) / beta; why 100: the note below it (paper: 3e-5)
clip_eps = 1e-3              # per-step clip: each step's log-ratio within +-clip_eps of the sampling model's (paper: 1e-6)
# Why beta = 100 and clip_eps = 1e-3 on the shapes world. The model's prediction for a trajectory is
# R = mean over steps of log p_theta/p_ref, each step's log-prob a per-dimension MEAN over the latent
# (sampling.ddim_step, as our DDPO's), so these numbers are in those units, not the paper's. clip_eps
# is train_ddpo.py's clip_range (ratio 1 +- 1e-3 is log-ratio +-1e-3 per step): the two trainers may
# move each step's likelihood equally far per epoch, so R moves by about 1e-3 per epoch, a few 1e-2
# over a run. shapes_aesthetic rewards of one prompt differ by ~0.5-1, so beta = 100 puts the targets
# (r_i - r_j) / beta at ~0.005-0.01: within reach after some 5-10 epochs, so the regression can be
# met and its pull back towards the pretrained model (the KL term) acts within the run. The paper's
# 3e-5 would put them at ~3e4, out of reach: PRDP is then a pairwise policy gradient bounded by
# clip_eps, with no KL effect (docs/gpu.md, the caveat under the GPU recipes). The log's pred_ratio says
# which regime a run is in.
# optimisation (PRDP: AdamW, weight decay 1e-4, grad-norm clip 1.0)
lr = 3e-3                    # AdamW learning rate on the LoRA weights (as train_ddpo.py; SD 1.5 LoRA: 3e-4)
weight_decay = 1e-4          # AdamW weight decay
max_grad_norm = 1.0          # gradient-norm clip
lora_rank = 4                # LoRA rank (alpha = rank)
# evaluation and logging
eval_every = 8               # epochs between evaluations (plain sampling, fixed prompts and seeds)
eval_prompts = 16            # prompts in the evaluation grid
eval_seeds = 4               # images per evaluation prompt
eval_batch_size = 16         # evaluation images sampled, decoded and scored at a time (memory only; may change on resume)
wandb_log = False            # also log each epoch to Weights & Biases (WANDB_MODE=offline: no network needed)
wandb_project = "diffexp"    # its W&B project
wandb_run_name = ""          # its W&B run name; "" = the run folder's name
tensorboard = False          # also write TensorBoard event files to <out>/tensorboard
stop_after = 0               # stop after this many epochs in this invocation (0 = never); re-run to resume
max_skips = 3                # a NaN/inf reward, sample or gradient skips its update; this many in a row stop the run
# hardware
device = "auto"              # auto (cuda if there is a GPU), cpu, cuda or cuda:N
precision = "auto"           # UNet arithmetic: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16 (plumbing/mixed_precision.py)
compile = "auto"             # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)
# ------------------------------------------------------------------------------------------------


def rdp_loss(R, R_clip, r, groups, beta):
    """PRDP's loss (eq. 14 with the proximal clip, eq. 16-18) reduced as the paper's code does (App.
    G; it is what the authors ran): per prompt group, the squared error of R_i - R_j against the
    target (r_i - r_j) / beta, the larger of the unclipped and clipped one, averaged over all B x B
    ordered pairs (i, j), then over the groups. Ties stay (App. G; Algorithm 1 takes every pair too):
    target 0, they pull two predictions together, and with discrete rewards (shapes_success) most
    pairs tie. R, R_clip [n]: predicted log p_theta/p_ref, unclipped and clipped; r [n] rewards;
    groups [n] prompt groups. Also returns the correlation and rms ratio of predicted to target
    differences on the untied pairs (ratio << 1: the targets are out of reach, beta is small)."""
    same = groups[:, None] == groups[None, :]
    target = (r[:, None] - r[None, :]) / beta
    pred, pred_clip = R[:, None] - R[None, :], R_clip[:, None] - R_clip[None, :]
    # Pessimistic, like PPO's clipped objective: the max is an upper bound of the unclipped loss, and
    # a pair whose clipped error is the larger gets no gradient from steps that left the clip band.
    err = torch.maximum((pred - target) ** 2, (pred_clip - target) ** 2)
    B = same.sum(1)  # the size of each trajectory's group: 1/B^2 per pair, 1/N per group
    loss = (same / (B[:, None] * B[None, :] * len(groups.unique())) * err).sum()
    untied = same & (r[:, None] > r[None, :])  # each untied pair once, for the diagnostics
    if not untied.any():  # every pair tied (e.g. a constant reward): nothing to correlate
        return loss, 0.0, 0.0
    p, q = pred.detach()[untied], target[untied]
    pc, qc = p - p.mean(), q - q.mean()
    corr = (pc * qc).sum() / ((pc * pc).sum() * (qc * qc).sum()).sqrt().clamp(min=1e-30)
    return loss, corr.item(), (p.pow(2).mean() / q.pow(2).mean()).sqrt().item()


def step_weights(new, old, r, groups, beta, clip_eps):
    """The loss, and per-step weights w [n, T] such that the gradient of sum(w * log p_theta) is the
    loss's gradient, from every step's log-ratio `new` [n, T] = log p_theta/p_ref under theta now
    (no gradient needed) and `old` [n, T], the sampling model's.

    The loss depends on trajectory i only through R_i = mean_t new[i, t] and R_clip_i = mean_t of
    the clipped log-ratios (App. G averages over steps where eq. 21 sums: beta absorbs the factor
    T). So dL/dR_i and dL/dR_clip_i, n numbers each, come from autograd on those [n] vectors alone,
    no UNet involved; then the chain rule: dR_i/dnew[i, t] = 1/T, dR_clip_i/dnew[i, t] = 1/T inside
    the clip band and 0 outside (torch.clamp's gradient), and dnew/dtheta = dlog p_theta/dtheta, as
    p_ref is fixed. (On an epoch's first update R == R_clip, torch.maximum splits the gradient half
    and half between them, and every step is inside the band: w is the unclipped gradient, as it
    should be.) Returns (w, loss, pred_corr, pred_ratio, inside [n, T])."""
    clipped = torch.clamp(new, old - clip_eps, old + clip_eps)  # the proximal clip, per step (eq. 20)
    R, R_clip = new.mean(1).requires_grad_(), clipped.mean(1).requires_grad_()
    loss, corr, size = rdp_loss(R, R_clip, r, groups, beta)
    dR, dR_clip = torch.autograd.grad(loss, (R, R_clip))
    inside = (new >= old - clip_eps) & (new <= old + clip_eps)
    w = (dR[:, None] + dR_clip[:, None] * inside) / new.shape[1]
    return w, loss.item(), corr, size, inside


def check_options():
    """This trainer's own input checks, one line each on failure (lifecycle.check has the ones
    every trainer shares)."""
    at_least(1, prompts_per_epoch=prompts_per_epoch, sample_batch_size=sample_batch_size,
             train_batch_size=train_batch_size, updates_per_epoch=updates_per_epoch)
    at_least(2, images_per_prompt=images_per_prompt)  # PRDP learns from pairs of images of one prompt
    positive(beta=beta, clip_eps=clip_eps)  # beta: the targets are (r_i - r_j) / beta
    require(0 < eta <= 1, f"--eta must be in (0, 1], got {eta}: with eta=0 DDIM is deterministic and a step has no "
                          "likelihood to take a log-ratio of, above 1 its variance outgrows the step (NaN samples); "
                          "PRDP samples with DDPM, i.e. eta=1.0 (SD 3.5: the flow SDE's noise level, e.g. 0.7)")
    samples_per_epoch = prompts_per_epoch * images_per_prompt
    require(sample_batch_size % images_per_prompt == 0 and samples_per_epoch % sample_batch_size == 0,
            f"--sample_batch_size={sample_batch_size} must be a multiple of images_per_prompt={images_per_prompt} "
            f"(a sampling call draws whole prompt groups) and divide prompts_per_epoch*images_per_prompt = "
            f"{samples_per_epoch}")


def main(check_only=False, observer=None):
    # ---- checks first: bad input costs nothing -------------------------------------------------
    # (check_only: experiments/compare.py and experiments/bench.py check the options they pass on)
    prompt_list = lifecycle.check(config)  # the checks every trainer shares (plumbing/lifecycle.py)
    check_options()  # and this one's own
    if check_only:
        return

    # ---- the run: folder, processes, model and reward, dashboards, fail-safe (plumbing/lifecycle.py) --
    run = lifecycle.start("prdp", config, prompt_list, observer)
    rank, world, dev, master = run.rank, run.world, run.dev, run.master
    pipe, reward_fn, skips = run.pipe, run.reward_fn, run.skips
    unet, scheduler = sampling.denoiser(pipe), pipe.scheduler  # the UNet, or SD 3.5's transformer
    torch.manual_seed(seed)  # LoRA's A is drawn from the global generator
    params = lora.inject(unet, rank=lora_rank)  # B = 0: theta starts as p_ref (Algorithm 1, line 1)
    compiling.unet(unet, compile, dev, replays=True)  # after the LoRA layers are in: they are part of the graph
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = mixed_precision.grad_scaler(unet)  # fp16 only: loss scaling; with bf16 and fp32 it does nothing
    scheduler.set_timesteps(num_steps, device=dev)
    timesteps = scheduler.timesteps
    num_batches = prompts_per_epoch * images_per_prompt // sample_batch_size  # sampling calls per epoch
    uncond_one = sampling.unconditional(pipe)  # one row: rollout expands it to the batch
    run.resume(unet, optimizer)  # from the run's checkpoint, if it has one

    for epoch in run.epochs():  # (the evaluation before any update, at epoch 0)
        exploring = explore and explore_active(epoch, epochs, explore_frac)

        # ---- 1. sample: N prompts x B images from theta_old, the model as it is now (Alg. 1, l. 3-7)
        # (as train_ddpo.py's step 1, deliberately: DiffExp enters each trainer here)
        unet.eval()
        batches = []
        for b in tqdm(range(num_batches), desc=f"epoch {epoch} sampling", disable=not master, leave=False):
            rng = sampling.random_streams(seed, epoch, b * world + rank)  # its own streams per process and batch
            n_prompts = sample_batch_size // images_per_prompt
            idx = torch.randint(len(prompt_list), (n_prompts,), generator=rng["prompts"])
            idx = idx.repeat_interleave(images_per_prompt)  # each prompt's B images side by side: a group
            batch_prompts = [prompt_list[i] for i in idx]
            weights = None
            if exploring and explore_weights:  # DiffExp random prompt weighting, drawn afresh per image
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
            # A chain that went NaN can still score a finite reward (a JPEG of NaN pixels has a size):
            # a sample is good only if its latents and log-probs are finite too.
            chain_ok = torch.isfinite(traj.latents).flatten(1).all(1) & torch.isfinite(traj.log_probs).all(1)
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond,
                                uncond=traj.uncond, scale=traj.guidance.expand(len(idx), -1),
                                rewards=r, chain_ok=chain_ok.float().cpu(), idx=idx))
        data = {k: sampling.cat([b[k] for b in batches]) for k in batches[0]}  # cat: also conditioning records
        n_local = len(data["rewards"])

        # ---- 3. reference: each recorded step's log-prob under p_ref, the pretrained model --------
        # The same UNet with its LoRA switched off, fed the same latents, guidance scales and prompt
        # embeddings that drew the step. One extra no-grad UNet call per step, no second model.
        #
        # Which policy is optimised while exploring: every step is scored (here, and under theta
        # below) with the scale and the weighted embedding that drew it, so the model fitted is the
        # exploring one, p_theta(x | weighted prompt, low early guidance), and its KL is measured
        # against the pretrained model under the same exploring conditioning. The LoRA it learns is
        # the one plain sampling uses, which is what evaluation measures (as in train_ddpo.py). One
        # approximation: the prompt weights differ between the B images of a prompt, so log Z of
        # eq. 8 cancels in a pair only up to the small difference that w ~ U(1, 1.2) makes.
        with lora.disabled(unet):
            lp_ref = sampling.replay(unet, scheduler, data, timesteps, eta, train_batch_size)
        # the sampling model's per-step log-ratio log p_theta_old/p_ref: fixed for the epoch (eq. 20)
        old = data["log_probs"] - lp_ref

        # gather every process's rewards, prompts and log-ratios: the loss is over the global batch
        all_r, all_ok, all_idx = (distributed.gather(data[k].to(dev)).cpu() for k in ("rewards", "chain_ok", "idx"))
        all_old = distributed.gather(old).cpu()
        all_prompts = [prompt_list[i] for i in all_idx]
        run.queries += len(all_r)
        good = run.good_samples(all_r, (all_ok > 0) & torch.isfinite(all_old).all(1), all_prompts, epoch,
                                "sampling or the reference model")  # the fail-safe: NaN or inf, no update
        samples_ok = bool(good.all())
        skipped = 0 if samples_ok else updates_per_epoch
        # every sampling call holds whole groups, and gather keeps rank order: group = index // B
        groups = torch.arange(len(all_r)) // images_per_prompt
        mine = slice(rank * n_local, (rank + 1) * n_local)  # this process's trajectories

        # ---- 4. train: K full-batch updates of the pairwise regression (Alg. 1, lines 9-12) -------
        # Never the graphs of all T steps of all trajectories at once: each update (a) computes every
        # step's log-ratio under theta without gradient, (b) turns the loss into per-step weights
        # (step_weights), (c) back-propagates them one step and micro-batch at a time (sampling.replay).
        unet.train()
        stats = defaultdict(list)
        for k in range(updates_per_epoch if samples_ok else 0):
            # (a) theta's log-ratios. First update: theta is still theta_old, they are `old` (free).
            all_new = all_old
            if k > 0:
                new = sampling.replay(unet, scheduler, data, timesteps, eta, train_batch_size) - lp_ref
                all_new = distributed.gather(new).cpu()
            # (b) the loss over every process's pairs and its per-step weights, the same on every rank
            w, loss, corr, size, inside = step_weights(all_new, all_old, all_r, groups, beta, clip_eps)
            # (c) back-propagate this process's share. x world: average_gradients divides the sum by it.
            # fp16: the weights carry the loss scale (scaler.scale), so small gradients survive fp16
            lp = sampling.replay(unet, scheduler, data, timesteps, eta, train_batch_size,
                        weights=scaler.scale(w[mine].to(dev) * world))
            if k == 0:  # on-policy check: theta_old recomputes the very log-probs it sampled with
                stats["ratio_dev"].append((lp - data["log_probs"]).exp().sub(1).abs().max().item())
                stats["pred_corr"].append(corr)
                stats["pred_ratio"].append(size)
            distributed.average_gradients(params)  # over the processes, what DDP would do (alone: nothing)
            scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping
            gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if torch.isfinite(gn):  # the same on every process: the gradients are averaged
                scaler.step(optimizer)
                skips.ok()
                stats["grad_norm"].append(gn.item())
            else:  # the fail-safe: a NaN or inf loss or gradient never reaches the weights
                skipped += 1
                if not mixed_precision.backing_off(scaler):  # fp16's loss scale too high is no fault
                    skips.skip(f"non-finite loss or gradient (gradient norm {gn.item()}) in epoch {epoch}, "
                               f"update {k}", prompts=all_prompts)
            scaler.update()  # fp16: halve the loss scale after an overflow, grow it after a while without
            optimizer.zero_grad(set_to_none=True)
            stats["loss"].append(loss)
        if samples_ok:
            stats["clipfrac"] = [(~inside).float().mean().item()]  # at the last update: how far the K updates went
            stats["kl_ref"] = [all_old.mean().item()]

        # ---- log, evaluate, checkpoint (plumbing/lifecycle.py) -------------------------------------
        # pred_corr / pred_ratio: how well theta_old's R_i - R_j predicts the fresh samples' reward
        # differences / how big it is next to the targets; kl_ref: mean per-step log p_theta_old/p_ref
        # on theta_old's own samples, an estimate of their KL (per step and latent dimension).
        d = {k: lifecycle.finite_mean(stats[k])
             for k in ("ratio_dev", "pred_corr", "pred_ratio", "loss", "grad_norm", "clipfrac", "kl_ref")}
        run.end_epoch(epoch, exploring, all_r[good], skipped, d,  # a skipped sample's reward: NaN
                      f"loss {d['loss']:.3e} | pred corr {d['pred_corr']:+.2f} ratio {d['pred_ratio']:.2e} | "
                      f"kl_ref {d['kl_ref']:.1e} | clipfrac {d['clipfrac']:.3f} | ratio-1 {d['ratio_dev']:.1e}",
                      checkpoint=dict(lora=lora.state_dict(unet), optimizer=optimizer.state_dict()))

    run.finish(lambda folder: lora.save(unet, folder))


if __name__ == "__main__":
    config = configurator.configure(globals())
    main()
