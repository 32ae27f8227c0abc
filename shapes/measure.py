"""Measuring the shapes world: how well its pretrained model draws what its captions ask for. The
docs/shapes_world.md's tables and grids come from here.

    python -m shapes.measure                      # the default world: every table, grids in docs/assets/

1. Quality: every caption at guidance 1, 3, 5 and 7.5, sampled through diffusers' own
   StableDiffusionPipeline (no project code), read by the judge and by the pixel checker, with
   diversity, appeal and the aesthetic score; next to the same numbers for real images.
2. Hard prompts: the captions that name a rare colour-shape pair (shapes_world.RARE_PAIRS, rare in
   the denoiser's pretraining data only) against the common ones, with this project's sampler: how
   often the right shape is drawn at each guidance scale and under DiffExp's exploration (the CFG
   schedule: guidance 1 for t > 800, then 5), each with and without the shape phrase up-weighted
   (w = 1.2, the top of DiffExp's U(1, 1.2)). The regime the paper is about: the base model rarely
   gets the rare ones right, but more than never.
3. Rewards: every shapes reward on the samples DDPO's first epoch sees (2 per caption, guidance 5,
   eta 1): the typical range of each for the base model.
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

import explore
import pipelines
import sampling
from plumbing import compiling, configurator, grids
from plumbing.configurator import at_least, between, require  # the input checks
from shapes import build as shapes_build
from shapes.models import (MAX_TOKENS, aesthetic_score, attribute_accuracy, clip_tokenizer, judge_read, load_aesthetic,
                           load_judge, new_scheduler)
from shapes.world import CAPTIONS, LABELS, appeal, caption, check, is_rare, prompts, render, sample_scenes

# defaults (override with --key=value; `python -m shapes.measure --help` lists them)
world = ""  # a built world folder; default: the default world (built first if missing)
per_prompt = 4  # quality table: samples per caption (72 captions) at each guidance scale
rare_seeds = 8  # hard-prompt table: samples per rare caption (18) in each setting
common_seeds = 2  # hard-prompt table: samples per common caption (54) in each setting
steps = 20  # DDIM steps
tables = "quality,hard,rewards"  # which tables: quality (and the grids), hard (rare vs. common), rewards (ranges)
assets = "docs/assets"  # where the grids and the JSON of the tables go
compile = "auto"  # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)

# ---------------------------------------------------------------------------------------------
# 1. Quality: every caption at each guidance scale, next to real images
GUIDANCE = (1.0, 3.0, 5.0, 7.5)
GRID_PROMPTS = [caption(*words) for words in [
    ("red", "circle", "dark"), ("green", "square", "light"), ("blue", "triangle", "grey"), ("yellow", "cross", "dark"),
    ("purple", "circle", "light"), ("orange", "triangle", "grey"), ("red", "square", "grey"), ("blue", "cross", "light")]]


def measure(images, labels, judge, tok, aesthetic_mlp, per_prompt):
    """Judge and pixel-checker agreement with the captions, appeal and aesthetic, and diversity:
    grids.diversity (pixels) and the spread of the shape's position. `images` come in runs of
    `per_prompt` images of one caption."""
    by_prompt = images.reshape(-1, per_prompt, *images.shape[1:])
    centroids = check(images)["centroid"].reshape(-1, per_prompt, 2)
    centroid_std = (centroids.std(1).norm(dim=1) / math.sqrt(2)).mean().item()  # per-axis std, in pixels
    with torch.no_grad():
        aes = aesthetic_score(judge, aesthetic_mlp, images)
    return dict(n=len(labels), judge=attribute_accuracy(judge_read(judge, tok, images), labels),
                pixels=attribute_accuracy(check(images), labels), diversity=round(grids.diversity(by_prompt), 4),
                centroid_std=round(centroid_std, 2), appeal=round(appeal(images).mean().item(), 3),
                aesthetic=round(aes.mean().item(), 3))


def evaluate_world(folder, per_prompt=4, steps=20, assets="docs/assets"):
    """Sample every caption at each guidance scale through diffusers' own StableDiffusionPipeline
    (loaded with no project code), judge the samples, write grids. Returns the rows and a markdown table."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    compiling.unet(pipe.unet, compile, pipe.device)
    pipe.set_progress_bar_config(disable=True)
    judge, aesthetic_mlp, tok = load_judge(folder), load_aesthetic(folder), clip_tokenizer(MAX_TOKENS)
    labels = torch.arange(len(CAPTIONS)).repeat_interleave(per_prompt)
    rows = {}
    # real data: the same captions, fresh positions and sizes (the judge never saw these images)
    scenes = sample_scenes(len(labels), torch.Generator().manual_seed(12345))
    c, s, b = [torch.tensor(v) for v in zip(*[LABELS[i] for i in labels])]
    scenes.update(colour=c, shape=s, background=b)
    rows["real images"] = measure(render(scenes), labels, judge, tok, aesthetic_mlp, per_prompt)
    samples = {}
    for w in GUIDANCE:
        t0, images = time.time(), []
        for i in tqdm(range(0, len(CAPTIONS), 8), desc=f"guidance {w}", dynamic_ncols=True):
            gen = [torch.Generator().manual_seed(1000 * j + k) for j in range(i, i + 8) for k in range(per_prompt)]
            images.append(pipe(CAPTIONS[i:i + 8], num_images_per_prompt=per_prompt, guidance_scale=w,
                               num_inference_steps=steps, generator=gen, output_type="pt").images)
        samples[w] = torch.cat(images)
        rows[f"guidance {w}"] = measure(samples[w], labels, judge, tok, aesthetic_mlp, per_prompt)
        rows[f"guidance {w}"]["images_per_s"] = round(len(labels) / (time.time() - t0), 1)
    # grids: the same seeds (initial noise) at guidance 1 and 5
    os.makedirs(assets, exist_ok=True)
    for w in (1.0, 5.0):
        gen = [torch.Generator().manual_seed(k) for _ in GRID_PROMPTS for k in range(8)]
        images = pipe(GRID_PROMPTS, num_images_per_prompt=8, guidance_scale=w, num_inference_steps=steps,
                      generator=gen, output_type="pt").images
        grids.save_grid(images, GRID_PROMPTS, os.path.join(assets, f"shapes_guidance{w:g}.png"), seeds=range(8),
                         titles=[f"guidance {w:g}, DDIM {steps} steps, eta 0 (the same seeds in both grids)"])
    lines = [f"DDIM {steps} steps, eta 0, {per_prompt} samples x {len(CAPTIONS)} prompts per row; "
             "agreement with the prompt as read by the judge / by the pixel checker", "",
             "| images | colour | shape | background | diversity (RMS px) | centroid std (px) | appeal | aesthetic |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        cells = [f"{m['judge'][k]:.2f} / {m['pixels'][k]:.2f}" for k in ("colour", "shape", "background")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['diversity']:.3f} | {m['centroid_std']:.1f} "
                     f"| {m['appeal']:.2f} | {m['aesthetic']:.2f} |")
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. Hard prompts: rare vs. common captions under the sampling settings DiffExp changes

REGIME_SETTINGS = [("guidance 1", 1.0), ("guidance 3", 3.0), ("guidance 5", 5.0), ("guidance 7.5", 7.5),
                   ("DiffExp schedule: 1 for t > 800, then 5", "diffexp")]


@torch.no_grad()
def shape_agreement(pipe, judge, tok, captions, seeds, guidance, weight):
    """Fraction of samples whose shape is the caption's, by the judge and by the pixel checker:
    every caption with every seed's initial noise (DDIM, eta 0), the shape phrase (the second
    marked phrase) up-weighted by `weight` (1 = plain)."""
    marked = [p for p in prompts() if explore.parse_phrases(p)[0] in captions]
    labels = torch.tensor([CAPTIONS.index(explore.parse_phrases(p)[0]) for p in marked for _ in range(seeds)])
    pipe.scheduler.set_timesteps(steps)
    scales = explore.cfg_schedule(pipe.scheduler, 5.0, 1.0, 800) if guidance == "diffexp" else guidance
    uncond, images = sampling.encode_prompts(pipe, [""]), []
    todo = [(p, s) for p in marked for s in range(seeds)]
    for i in range(0, len(todo), 32):
        chunk = todo[i:i + 32]
        texts = [p for p, _ in chunk]
        weights = (torch.ones(len(chunk), dtype=torch.long), torch.full((len(chunk),), weight)) if weight != 1 else None
        noise = torch.stack([sampling.initial_noise(pipe, 1, torch.Generator().manual_seed(s))[0] for _, s in chunk])
        images.append(sampling.rollout(pipe, sampling.encode_prompts(pipe, texts, weights), uncond, scales,
                                       num_steps=steps, eta=0.0, latents=noise).images)
    images = torch.cat(images)
    return dict(judge=attribute_accuracy(judge_read(judge, tok, images), labels)["shape"],
                pixels=attribute_accuracy(check(images), labels)["shape"])


def regime_table(folder):
    """The hard-prompt table: shape agreement of rare and common captions, judge / pixel checker."""
    pipe = pipelines.load_pipeline(folder)
    compiling.unet(pipe.unet, compile, pipe.device)
    judge, tok = load_judge(folder), clip_tokenizer(MAX_TOKENS)
    rare = [c for i, c in enumerate(CAPTIONS) if is_rare(i)]
    common = [c for i, c in enumerate(CAPTIONS) if not is_rare(i)]
    rows = {}
    for name, guidance in tqdm(REGIME_SETTINGS, desc="hard prompts", dynamic_ncols=True):
        groups = (("rare", rare, rare_seeds), ("common", common, common_seeds))
        rows[name] = {f"{group}, {'shape x1.2' if w != 1 else 'plain'}": shape_agreement(pipe, judge, tok, caps, n, guidance, w)
                      for w in (1.0, 1.2) for group, caps, n in groups}
    cols = list(next(iter(rows.values())))
    lines = [f"Shape drawn as the caption asks, judge / pixel checker: {len(rare)} rare captions x {rare_seeds} seeds, "
             f"{len(common)} common x {common_seeds}; DDIM {steps} steps, eta 0", "",
             "| sampling | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]['judge']:.2f} / {row[c]['pixels']:.2f}" for c in cols) + " |")
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 3. The world's rewards on what DDPO's first epoch sees: their typical range for the base model

@torch.no_grad()
def reward_ranges(folder):
    """Every shapes reward, and the JPEG size, on 2 samples of each caption at guidance 5, `steps` DDIM steps,
    eta 1."""
    import rewards
    pipe = pipelines.load_pipeline(folder)
    compiling.unet(pipe.unet, compile, pipe.device)
    todo = [p for p in prompts() for _ in range(2)]
    g = sampling.random_streams(0, 0)
    traj = sampling.rollout(pipe, sampling.encode_prompts(pipe, todo), sampling.encode_prompts(pipe, [""]), 5.0,
                            num_steps=steps, eta=1.0, latents=sampling.initial_noise(pipe, len(todo), g["noise"]),
                            generator=g["ddim"])
    clean = [explore.parse_phrases(p)[0] for p in todo]
    rows = {}
    for name in ("shapes_alignment", "shapes_aesthetic", "shapes_appeal", "shapes_correct", "shapes_success",
                 "jpeg_incompressibility"):
        options = {} if name.startswith("jpeg") else dict(path=folder)  # the JPEG size needs no model
        r = rewards.load(name, **options)(traj.images, clean).float()
        rows[name] = dict(mean=r.mean().item(), std=r.std().item(), min=r.min().item(), max=r.max().item())
    lines = [f"Rewards of the base model's samples: 72 captions x 2, guidance 5, {steps} DDIM steps, eta 1", "",
             "| reward | mean +- std | range |", "|---|---|---|"]
    lines += [f"| {n} | {v['mean']:.2f} +- {v['std']:.2f} | {v['min']:.2f} to {v['max']:.2f} |" for n, v in rows.items()]
    return rows, "\n".join(lines)


def main():
    # checks first: bad input costs nothing
    at_least(2, per_prompt=per_prompt)  # diversity and the centroid spread compare a caption's samples
    at_least(1, rare_seeds=rare_seeds, common_seeds=common_seeds)
    compiling.check(compile)
    between(1, new_scheduler().config.num_train_timesteps, steps=steps)
    require(not world or shapes_build.is_complete(world),
            f"--world={world} is not a built shapes world (no folder with a matching world.json); "
            "build one with python -m shapes.build, or leave --world empty for the default")
    which = [t.strip() for t in tables.split(",") if t.strip()]
    if not which or set(which) - {"quality", "hard", "rewards"}:
        raise SystemExit(f"error: --tables takes quality, hard and/or rewards (comma-separated), got {tables!r}")
    try:
        folder = world or shapes_build.check_shipped()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    results, text = dict(folder=os.path.basename(folder), steps=steps), []
    if "quality" in which:
        results["quality"], md = evaluate_world(folder, per_prompt=per_prompt, steps=steps, assets=assets)
        results["per_prompt"] = per_prompt
        text.append(md)
    if "hard" in which:
        results["hard_prompts"], md = regime_table(folder)
        results.update(rare_seeds=rare_seeds, common_seeds=common_seeds)
        text.append(md)
    if "rewards" in which:
        results["rewards"], md = reward_ranges(folder)
        text.append(md)
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, f"shapes_{'_'.join(which)}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n\n".join(text))


if __name__ == "__main__":
    configurator.configure(globals())
    main()
