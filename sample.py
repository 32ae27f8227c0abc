"""Image grids from a base model or a fine-tuned LoRA, plainly and with DiffExp's exploration side
by side: the command-line front end of sampling.py's loop (plumbing/evaluation.py's sample_grid).

    python sample.py                                  # the shapes world's prompts, 4 seeds each
    python sample.py --prompt="a (red) (circle)" --lora=out/ddpo
    python sample.py --explore                        # plain vs DiffExp exploration, side by side
"""
import os

import torch

import pipelines
import prompt_sets
import sampling
from plumbing import compiling, configurator, distributed, evaluation, grids, mixed_precision, runs
from lora import FILE_NAME, load as load_lora, weights_file  # `lora` is this script's --lora option
from plumbing.configurator import at_least, between, require  # the input checks

# defaults (override with --key=value; `python sample.py --help` lists them)
model = "shapes"  # "shapes" (the offline world), a hub id, or a local diffusers folder
revision = ""  # hub --model only: a branch, tag or commit to pin its weights to ("" = main)
variant = ""  # weight files of this variant, e.g. fp16 (*.fp16.safetensors); "" = the plain ones
t5 = True  # SD 3.5 only: load its T5 text encoder (--no-t5: not loaded, zeros for its tokens, GBs less memory)
prompt = ""  # one prompt to sample (overrides --prompts); mark phrases with (parentheses)
prompts = "auto"  # prompt set name or text file; auto = the world's captions for shapes, else animals
num_prompts = 8  # grid rows: the first N prompts
num_seeds = 4  # grid columns: seeds seed, seed+1, ...
seed = 0  # first seed (initial noise); also seeds the prompt weights and DDIM noise
lora = ""  # LoRA weights to load into the UNet: a run folder, its lora/ folder or a .safetensors file
guidance = 5.0  # classifier-free guidance scale (w_high when exploring)
steps = 20  # DDIM steps
eta = 0.0  # DDIM eta, in [0, 1]: 0 = deterministic DDIM, 1 = the stochastic policy DDPO trains
explore = False  # also sample with DiffExp exploration, side by side, and print the diversity of each
w_low = 1.0  # exploration: guidance scale for the noisy timesteps t > t_thres
t_thres = 800  # exploration: timestep threshold of the guidance schedule
batch_size = 16  # images per denoising batch
device = "auto"  # auto (cuda if there is a GPU), cpu, cuda or cuda:N
precision = "auto"  # UNet arithmetic: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16 (plumbing/mixed_precision.py)
compile = "auto"  # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)
out = "out/samples.png"  # where the grid PNG goes


def main():
    # checks first: bad input costs nothing
    at_least(1, num_prompts=num_prompts, num_seeds=num_seeds, steps=steps, batch_size=batch_size)
    at_least(0, guidance=guidance, w_low=w_low, t_thres=t_thres)
    between(0, 1, eta=eta)  # above 1 the DDIM step's variance outgrows the step (NaN images)
    between(0, 2**32 - 1, seed=seed)
    require(not lora or weights_file(lora), f"--lora={lora}: no LoRA weights there; pass a run folder (out/<run>), "
                                         f"its lora/ folder or a {FILE_NAME} file")
    require(os.path.splitext(out)[1].lower() in (".png", ".jpg", ".jpeg"), f"--out must end in .png or .jpg, got {out!r}")
    require(not os.path.isdir(out), f"--out={out} is a folder; pass the grid's file name, e.g. {out}/samples.png")
    runs.check_writable(os.path.dirname(out) or ".")  # refused before sampling every image, not after
    distributed.check_device(device)
    mixed_precision.check(precision)
    compiling.check(compile)
    if prompt:
        prompt_list = prompt_sets.check_marks([prompt])
    else:
        name = prompts if prompts != "auto" else ("shapes" if model == "shapes" else "animals")
        prompt_list = prompt_sets.load_prompts(name)[:num_prompts]
    dev = distributed.use_device(device)
    try:
        pipe = pipelines.load_pipeline(model, dev, precision, revision=revision or None, variant=variant or None, t5=t5)
        if lora:
            load_lora(sampling.denoiser(pipe), weights_file(lora))  # the UNet, or SD 3.5's transformer
        compiling.unet(sampling.denoiser(pipe), compile, dev)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    T = pipe.scheduler.config.num_train_timesteps  # the last checks: they need the model's number of timesteps
    require(steps <= T, f"--steps must be <= the model's {T} training timesteps, got {steps}")
    require(t_thres < T, f"--t_thres must be below the model's {T} training timesteps, got {t_thres}")
    seeds = list(range(seed, seed + num_seeds))
    with torch.no_grad():
        settings = dict(guidance=guidance, steps=steps, eta=eta, w_low=w_low, t_thres=t_thres, seed=seed,
                        batch_size=batch_size)
        blocks = [evaluation.sample_grid(pipe, prompt_list, seeds, exploring=False, **settings)]
        titles = [f"plain: guidance {guidance:g}"]
        if explore:
            blocks.append(evaluation.sample_grid(pipe, prompt_list, seeds, exploring=True, **settings))
            titles.append(f"explore: guidance {w_low:g} for t > {t_thres}, then {guidance:g}; one phrase x U(1, 1.2)")
    if num_seeds > 1:
        for title, imgs in zip(titles, blocks):
            print(f"diversity (mean pairwise RMS pixel distance between seeds of a prompt), {title.split(':')[0]}: "
                  f"{grids.diversity(imgs):.4f}")
    grids.save_grid(blocks, prompt_list, out, titles, seeds)
    print(out)


if __name__ == "__main__":
    configurator.configure(globals())
    main()

