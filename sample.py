"""Image grids from a base model or a fine-tuned LoRA, plainly and with DiffExp's exploration side
by side: the command-line front end of sampling.py.

    python sample.py                                  # the shapes world's prompts, 4 seeds each
    python sample.py --prompt="a (red) (circle)" --lora=out/ddpo
    python sample.py --explore                        # plain vs DiffExp exploration, side by side
"""
import torch

import configurator
import grids
import pipelines
import prompt_sets
import sampling
from lora import load as load_lora  # `lora` is this script's --lora option

# defaults (override with --key=value; `python sample.py --help` lists them)
model = "shapes"  # "shapes" (the offline world), a hub id, or a local diffusers folder
prompt = ""  # one prompt to sample (overrides --prompts); mark phrases with (parentheses)
prompts = "auto"  # prompt set name or text file; auto = the world's captions for shapes, else animals
num_prompts = 8  # grid rows: the first N prompts
num_seeds = 4  # grid columns: seeds seed, seed+1, ...
seed = 0  # first seed (initial noise); also seeds the prompt weights and DDIM noise
lora = ""  # LoRA weights to load into the UNet: a run directory or a weights file
guidance = 5.0  # classifier-free guidance scale (w_high when exploring)
steps = 20  # DDIM steps
eta = 0.0  # DDIM eta: 0 = deterministic DDIM, 1 = the stochastic policy DDPO trains
explore = False  # also sample with DiffExp exploration, side by side, and print the diversity of each
w_low = 1.0  # exploration: guidance scale for the noisy timesteps t > t_thres
t_thres = 800  # exploration: timestep threshold of the guidance schedule
batch_size = 16  # images per denoising batch
device = "auto"  # auto = cuda if available, else cpu
out = "out/samples.png"  # where the grid PNG goes


def main():
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if prompt:
        prompt_list = prompt_sets.check_marks([prompt])
    else:
        name = prompts if prompts != "auto" else ("shapes" if model == "shapes" else "animals")
        prompt_list = prompt_sets.load_prompts(name)[:num_prompts]
    try:
        pipe = pipelines.load_pipeline(model, dev)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if lora:
        load_lora(pipe.unet, lora)
    seeds = list(range(seed, seed + num_seeds))
    with torch.no_grad():
        settings = dict(guidance=guidance, steps=steps, eta=eta, w_low=w_low, t_thres=t_thres, seed=seed,
                        batch_size=batch_size)
        blocks = [sampling.sample_grid(pipe, prompt_list, seeds, exploring=False, **settings)]
        titles = [f"plain: guidance {guidance:g}"]
        if explore:
            blocks.append(sampling.sample_grid(pipe, prompt_list, seeds, exploring=True, **settings))
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

