"""Scoring a model on a prompt set, per category: the base model or a finished run's LoRA, any prompt
set, any reward. DiffExp (Chae et al. 2025) measures generalisation this way, on prompts the
fine-tuning never saw: unseen animals and DrawBench (Saharia et al. 2022; its 11 categories).

    python -m experiments.evaluate --lora=out/ddpo-shapes_aesthetic-explore-s0             # the run's model and reward
    python -m experiments.evaluate --lora=out/<run> --prompts=shapes_rare --reward=shapes_success
    python -m experiments.evaluate --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --reward=pickscore --prompts=drawbench
    python -m experiments.evaluate --lora=out/<sd run> --reward=pickscore --prompts=drawbench \\
        --baseline=out/eval-stable-diffusion-v1-5-drawbench-pickscore/table.json   # the paired difference

Every prompt is sampled `num_seeds` times, plainly (constant guidance, unweighted prompts), with seed
s's initial noise the same for every prompt and every model (plumbing/evaluation.py's sample_grid,
as sample.py draws it): with eta = 0 an image depends only on its prompt, seed and model, so two
evaluations with the same settings are paired image by image and --baseline reports each category's paired
difference. The categories: DrawBench's own, hard/common and background on the shapes world's
captions, one for any other set (prompt_sets.categories). Writes, each file atomically, into --out
(default <run>/eval-<prompts>-<reward>, or out/eval-<model>-<prompts>-<reward> for a base model):
table.md and table.json (per category, and every prompt's rewards) and grid.png (the first prompts
of each category).
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import pipelines
import prompt_sets
import rewards
import sampling
from plumbing import compiling, configurator, distributed, evaluation, grids, runs
from experiments.compare_stats import mean_interval, paired_difference
from explore import parse_phrases
from lora import load as load_lora, weights_file  # `lora` is this script's --lora option
from plumbing.configurator import at_least, between, require  # the input checks

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python -m experiments.evaluate --help` lists them)
lora = ""                    # LoRA to evaluate: a run folder (out/<run>), its lora/ folder or the file; "" = the base model
model = "auto"               # auto: the run's model with --lora, else shapes; or 'shapes', a hub id, a diffusers folder
revision = ""                # hub --model only: a branch, tag or commit ("" = main; with model auto, the run's)
variant = ""                 # weight files of this variant, e.g. fp16 ("" = the plain ones; with model auto, the run's)
reward = "auto"              # a rewards.py name; auto: the run's reward with --lora, else shapes_aesthetic / aesthetic
reward_options = ""          # rewards.load options, "key=value,..." (with reward auto and --lora: the run's)
prompts = "auto"             # prompt set or text file; auto: shapes on the shapes world, else drawbench
per_category = 0             # at most this many prompts of each category (0 = all), for a quick look
num_seeds = 4                # images per prompt: initial-noise seeds 0..num_seeds-1, the same for every model
guidance = 5.0               # classifier-free guidance scale (constant: plain sampling)
num_steps = 20               # DDIM steps (SD 1.5 in the papers: 50)
eta = 0.0                    # DDIM eta in [0, 1]; 0 makes each image depend only on prompt, seed and model
batch_size = 16              # images per denoising batch
baseline = ""                # a table.json of another evaluation with the same prompts and settings (e.g. the base
                             # model's): adds each category's paired difference with its 95% t-interval
grid_prompts = 2             # grid rows per category (its first prompts); 0 = no grid
grid_seeds = 4               # grid columns (the first seeds)
device = "auto"              # auto = cuda if available, else cpu
compile = "auto"             # torch.compile the UNet: auto (on CUDA, off on the CPU), on, off (plumbing/compiling.py)
out = ""                     # output folder; default <run>/eval-<prompts>-<reward> or out/eval-<model>-<prompts>-<reward>
# ------------------------------------------------------------------------------------------------


def run_config(weights):
    """The config.json of the run a LoRA file comes from (out/<run>/lora/<file>), or {}."""
    folder = os.path.dirname(os.path.abspath(weights))
    for d in (folder, os.path.dirname(folder)) if os.path.basename(folder) == "lora" else (folder,):
        path = os.path.join(d, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return dict(json.load(f), run_dir=d)
            except ValueError as e:
                raise SystemExit(f"error: {path} is not readable JSON ({e}); pass --model and --reward explicitly")
    return {}


def resolve():
    """Every option with auto resolved (from the run's config.json where it applies), checked before
    any model work: a dict, or a one-line error."""
    at_least(1, num_seeds=num_seeds, num_steps=num_steps, batch_size=batch_size, grid_seeds=grid_seeds)
    at_least(0, per_category=per_category, grid_prompts=grid_prompts, guidance=guidance)
    compiling.check(compile)
    between(0, 1, eta=eta)
    require(not lora or weights_file(lora), f"--lora={lora}: no LoRA weights there; pass a run folder (out/<run>), "
                                            "its lora/ folder or a .safetensors file")
    distributed.check_device(device)
    run = run_config(weights_file(lora)) if lora else {}
    own = model == "auto"  # the run's model: its revision and variant too, unless given
    cfg = dict(lora=weights_file(lora) or "", run=os.path.basename(run.get("run_dir", "")),
               model=run.get("model", "shapes") if own else model,
               revision=revision or (run.get("revision", "") if own else ""),
               variant=variant or (run.get("variant", "") if own else ""),
               t5=run.get("t5", runs.ADDED_OPTIONS["t5"]) if own else True)  # SD 3.5: the run's T5 choice (older runs: with)
    cfg["reward"] = reward if reward != "auto" else run.get("reward") or (
        "shapes_aesthetic" if cfg["model"] == "shapes" else "aesthetic")
    cfg["reward_options"] = reward_options or (run.get("reward_options", "") if reward == "auto" else "")
    cfg["prompts"] = prompts if prompts != "auto" else ("shapes" if cfg["model"] == "shapes" else "drawbench")
    require(cfg["reward"] in rewards.REWARDS, f"unknown reward {cfg['reward']!r}; known rewards: {', '.join(rewards.REWARDS)}")
    configurator.parse_options(cfg["reward_options"])
    cfg.update(num_seeds=num_seeds, guidance=guidance, num_steps=num_steps, eta=eta, per_category=per_category)
    name = os.path.splitext(os.path.basename(cfg["prompts"]))[0]
    where = run.get("run_dir") or (os.path.dirname(cfg["lora"]) if lora else "out")
    label = "" if lora else "-" + os.path.basename(cfg["model"].rstrip("/"))
    cfg["out"] = out or os.path.join(where, f"eval{label}-{name}-{cfg['reward']}")
    runs.check_writable(cfg["out"])  # a file in the way, no permission: refused before the evaluation, not after
    return cfg


def read_baseline(cfg, prompt_list):
    """The per-prompt rewards of --baseline, refused unless it scored the same prompts the same way."""
    try:
        with open(baseline) as f:
            base = json.load(f)
        same = {k: base["config"][k] for k in ("reward", "num_seeds", "guidance", "num_steps", "eta")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --baseline={baseline}: not a table.json of experiments/evaluate.py ({e})")
    for k, v in same.items():
        require(v == cfg[k], f"--baseline={baseline} was evaluated with {k}={v!r}, this one with {cfg[k]!r}; "
                             "a paired difference needs the same settings")
    require([p["prompt"] for p in base["per_prompt"]] == prompt_list,
            f"--baseline={baseline} scored other prompts (or another order) than --prompts={cfg['prompts']}")
    return [sum(p["rewards"]) / len(p["rewards"]) for p in base["per_prompt"]]


def summary_rows(cats, per_prompt, base_means):
    """One row per category, then 'all': prompts, images, mean reward with the 95% t-interval over
    the category's prompts (the sampled unit of a generalisation claim), std over its images, and the
    paired difference from the baseline's prompts when there is one."""
    rows = {}
    for cat in list(dict.fromkeys(cats)) + ["all"]:
        idx = [i for i, c in enumerate(cats) if cat in (c, "all")]
        means = [sum(per_prompt[i]) / len(per_prompt[i]) for i in idx]
        images = torch.tensor([r for i in idx for r in per_prompt[i]])
        mean, half = mean_interval(means)
        rows[cat] = dict(prompts=len(idx), images=len(images), mean=mean, low=mean - half, high=mean + half,
                         std=images.std().item() if len(images) > 1 else 0.0)
        if base_means is not None:
            rows[cat]["vs_baseline"] = paired_difference(means, [base_means[i] for i in idx])
    return rows


def table_markdown(cfg, rows):
    what = cfg["model"] + (f" + LoRA {cfg['lora']}" if cfg["lora"] else "")
    lines = [f"## {what}: {cfg['reward']} on {cfg['prompts']}", "",
             f"{rows['all']['prompts']} prompts x {cfg['num_seeds']} seeds, guidance {cfg['guidance']:g}, "
             f"{cfg['num_steps']} DDIM steps, eta {cfg['eta']:g}; reward mean +- the 95% t-interval over the "
             "category's prompts" + ("; paired difference from the baseline, same prompts and seeds" if baseline else ""), "",
             "| category | prompts | images | reward | std over images |" + (" minus baseline [95%] |" if baseline else ""),
             "|---|---:|---:|---|---:|" + ("---|" if baseline else "")]
    for cat, r in rows.items():
        line = (f"| {'**all**' if cat == 'all' else cat} | {r['prompts']} | {r['images']} | "
                f"{r['mean']:.4f} +- {(r['high'] - r['low']) / 2:.4f} | {r['std']:.4f} |")
        if "vs_baseline" in r:
            d = r["vs_baseline"]
            line += f" {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main():
    # ---- checks first: bad input costs nothing ------------------------------------------------
    cfg = resolve()
    prompt_list = prompt_sets.load_prompts(cfg["prompts"])
    cats = prompt_sets.categories(prompt_list, os.path.splitext(os.path.basename(cfg["prompts"]))[0])
    if per_category:
        keep = [i for i, c in enumerate(cats) if cats[:i].count(c) < per_category]
        prompt_list, cats = [prompt_list[i] for i in keep], [cats[i] for i in keep]
    base_means = read_baseline(cfg, prompt_list) if baseline else None
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        pipelines.check_model(cfg["model"], cfg["revision"] or None)
        reward_fn = rewards.load(cfg["reward"], device=dev, **configurator.parse_options(cfg["reward_options"]))
        pipe = pipelines.load_pipeline(cfg["model"], dev, revision=cfg["revision"] or None, variant=cfg["variant"] or None,
                                       t5=cfg["t5"])
        if cfg["lora"]:
            load_lora(sampling.denoiser(pipe), cfg["lora"])
        compiling.unet(sampling.denoiser(pipe), compile, dev)
    except (ValueError, TypeError, rewards.RewardUnavailable) as e:
        raise SystemExit(f"error: {e}")
    T = pipe.scheduler.config.num_train_timesteps
    require(num_steps <= T, f"--num_steps must be <= the model's {T} training timesteps, got {num_steps}")

    # ---- sample and score, a few prompts at a time (one denoising batch) -----------------------
    t0, seeds = time.time(), list(range(num_seeds))
    per_batch = max(1, batch_size // num_seeds)
    order = list(dict.fromkeys(cats))  # the grid's rows: each category's first prompts, category by category
    shown = sorted((i for i, c in enumerate(cats) if cats[:i].count(c) < grid_prompts), key=lambda i: (order.index(cats[i]), i))
    per_prompt, grid_images = [], {}
    with torch.no_grad(), tqdm(total=len(prompt_list) * num_seeds, desc="evaluating", unit="image") as bar:
        for i in range(0, len(prompt_list), per_batch):
            chunk = prompt_list[i:i + per_batch]
            images = evaluation.sample_grid(pipe, chunk, seeds, guidance, num_steps, eta, batch_size=batch_size)
            clean = [parse_phrases(p)[0] for p in chunk for _ in seeds]
            r = reward_fn(images.flatten(0, 1).to(dev), clean).float().cpu().view(len(chunk), num_seeds)
            per_prompt += r.tolist()
            for j in range(len(chunk)):
                if i + j in shown:  # at most 128 px a tile: a DrawBench grid of SD images stays a few MB
                    tiles = images[j, :grid_seeds]
                    grid_images[i + j] = (F.interpolate(tiles, size=128, mode="bilinear", antialias=True)
                                          if tiles.shape[-1] > 128 else tiles)
            bar.update(len(chunk) * num_seeds)
    if not torch.isfinite(torch.tensor(per_prompt)).all():
        print("warning: some rewards are NaN or infinite; they make their category's numbers NaN", file=sys.stderr)

    # ---- write: the table (markdown and JSON) and the grid, each atomically ----------------------
    rows = summary_rows(cats, per_prompt, base_means)
    result = dict(config=cfg, categories=rows, seconds=round(time.time() - t0, 1),
                  per_prompt=[dict(prompt=p, category=c, rewards=r) for p, c, r in zip(prompt_list, cats, per_prompt)])
    os.makedirs(cfg["out"], exist_ok=True)
    md = table_markdown(cfg, rows)
    runs.write_text(os.path.join(cfg["out"], "table.json"), json.dumps(result, indent=1) + "\n")
    runs.write_text(os.path.join(cfg["out"], "table.md"), md)
    written = ["table.md", "table.json"]
    if grid_images:
        captions = [f"[{cats[i]}] {parse_phrases(prompt_list[i])[0]}"[:100] for i in shown]
        title = f"{cfg['run'] or os.path.basename(cfg['model'].rstrip('/'))}: {cfg['reward']} {rows['all']['mean']:.4f}"
        grids.save_grid(torch.stack([grid_images[i] for i in shown]), captions, os.path.join(cfg["out"], "grid.png"),
                        titles=[title], seeds=seeds[:grid_seeds])
        written.append("grid.png")
    print("\n" + md)
    print(f"{len(prompt_list) * num_seeds} images in {result['seconds']:.0f} s; written: "
          + ", ".join(os.path.join(cfg["out"], w) for w in written))
    return result


if __name__ == "__main__":
    configurator.configure(globals())
    main()
