"""What exploring does to the samples a trainer learns from, measured before any comparison is run.

DiffExp's argument (Chae et al., AAAI 2025, Sec. 1 and 3) is about the samples: a low guidance scale
on the noisy steps and a randomly up-weighted phrase should draw more of the rare high-reward images,
or a wider spread of rewards, for the fine-tuning to learn from. This tool measures exactly that.
From the base model and at checkpoints of a baseline run, every training prompt is sampled `samples`
times plainly and with each exploring variant of experiments/compare.py (explore, cfg_only,
weights_only, w_low0), with the trainer's own sampling settings (guidance, DDIM steps, eta, t_thres,
weight_max) and the same initial noise and DDIM noise in every variant; each cell of the table is
the reward distribution the trainer would receive:

    python -m experiments.mechanism --trainer=ddpo --args="--epochs=24 --num_steps=20"   # the hard task (default)
    python -m experiments.mechanism --trainer=alignprop

Columns: the mean (with the paired difference from plain sampling and its 95% interval over the
samples), the std over all samples and within a prompt (what DDPO's per-prompt advantages divide
by), the mean of the top 10%, the fraction above plain sampling's 90th percentile at the same
checkpoint, and on a shapes world the pixel checker's success rate (`shapes_success`).

The checkpoints are a baseline run of the trainer (seed 0, --args; its folder <out>/baseline is the
trainer's own run, resumed with --stop_after from one checkpoint to the next), on the same training
prompts as compare.py's (the same hold-out); each checkpoint's LoRA weights are kept as
<out>/lora-e<epoch>.pt. Re-running the command reuses what is there. Outputs: <out>/table.md and
<out>/table.json.
"""
import json
import os
import shlex
import subprocess
import sys

import torch
from tqdm import tqdm

import explore
import lora
import pipelines
import rewards
from plumbing import configurator, evaluation, runs
from plumbing.configurator import at_least, require
from experiments import compare, pooling
from experiments.compare_stats import paired_difference, read_log

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python -m experiments.mechanism --help` lists them)
trainer = "ddpo"             # whose samples: ddpo, alignprop or prdp (their sampling settings and baseline run)
reward = "shapes_alignment"  # the reward the trainer would receive
prompts = "shapes_rare"      # training prompt set (minus compare.py's held-out prompts)
args = ""                    # other trainer options, one string, as compare.py's --args (sampling and the baseline run)
checkpoints = "0,0.5,1"      # fractions of the baseline run's epochs to measure at (0 = the base model)
samples = 16                 # samples per training prompt and variant (noise seeds 0..samples-1, the same in every variant)
out = ""                     # output folder; default out/mechanism-<trainer>-<reward>
# ------------------------------------------------------------------------------------------------

VARIANTS = dict(plain=[], **{a: f for a, f in {**compare.ARMS, **compare.ABLATION_ARMS}.items() if a != "baseline"})


def resolve(argv):
    """The trainer's resolved options for `argv`, by the trainer's own defaults and parser."""
    return configurator.fresh(compare.TRAINERS[trainer], argv).config


def train_to(folder, argv, epoch):
    """The baseline run's LoRA state at `epoch` (0: None, the base model), training (or resuming) the
    run up to it once and keeping the weights in <folder>/lora-e<epoch>.pt."""
    path = os.path.join(folder, f"lora-e{epoch}.pt")
    if epoch == 0:
        return None
    if not os.path.exists(path):
        run_dir = os.path.join(folder, "baseline")
        done = len(read_log(run_dir))
        require(done <= epoch, f"{run_dir} has trained past epoch {epoch} without keeping its weights there; "
                               f"delete {run_dir} and re-run")
        if done < epoch:
            script = os.path.join(compare.ROOT, compare.TRAINERS[trainer] + ".py")
            with open(os.path.join(folder, "baseline.txt"), "a") as log:
                cmd = [sys.executable, script, *argv, f"--stop_after={epoch - done}"]
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                print(f"training the baseline run to epoch {epoch} (output: {folder}/baseline.txt)", flush=True)
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                raise SystemExit(f"error: the baseline run failed (exit code {code}); see {folder}/baseline.txt")
        state = runs.load_checkpoint(run_dir)["lora"]
        runs.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return torch.load(path, weights_only=True)


def stats(r, success, plain, per_prompt):
    """One cell of the table: rewards `r` [N] (prompt-major, `per_prompt` each), the pixel checker's
    successes (or None), and plain sampling's rewards at the same checkpoint (paired sample by sample)."""
    top = r.sort(descending=True).values[:max(1, len(r) // 10)]
    p90 = plain.quantile(0.9)
    return dict(mean=r.mean().item(), vs_plain=paired_difference(r.tolist(), plain.tolist()),
                std=r.std().item(), within_prompt_std=r.reshape(-1, per_prompt).std(1).mean().item(),
                top10=top.mean().item(), above_plain_p90=(r > p90).float().mean().item(),
                success=None if success is None else success.mean().item())


def table_markdown(result):
    rows = [f"**{result['trainer']}**'s samples, reward `{result['reward']}`, {len(result['prompts'])} training prompts of "
            f"`{result['prompt_set']}` x {result['samples']} samples per variant (the same noise in each); sampling: "
            f"guidance {result['sampling']['guidance']:g}, {result['sampling']['num_steps']} DDIM steps, eta "
            f"{result['sampling']['eta']:g}, t_thres {result['sampling']['t_thres']}; checkpoints of a baseline run "
            f"(options: `{result['args'] or 'defaults'}`).", "",
            "| epoch | sampling | mean reward | minus plain [95% interval] | std | std within a prompt | top 10% mean "
            "| above plain's 90th percentile | pixel-checker success |", "|---|---|---|---|---|---|---|---|---|"]
    for epoch, cells in result["cells"].items():
        for variant, c in cells.items():
            d = c["vs_plain"]
            diff = "–" if variant == "plain" else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            success = "–" if c["success"] is None else f"{c['success']:.3f}"
            rows.append(f"| {epoch} | {variant} | {c['mean']:.3f} | {diff} | {c['std']:.3f} | {c['within_prompt_std']:.3f} "
                        f"| {c['top10']:.3f} | {c['above_plain_p90']:.3f} | {success} |")
    return "\n".join(rows) + "\n"


def main():
    require(trainer in compare.TRAINERS, f"--trainer must be one of {', '.join(compare.TRAINERS)}, got {trainer!r}")
    require(reward in rewards.REWARDS, f"unknown reward {reward!r}; known rewards: {', '.join(rewards.REWARDS)}")
    at_least(2, samples=samples)
    try:
        fractions = sorted({float(f) for f in checkpoints.split(",")})
    except ValueError:
        raise SystemExit(f"error: --checkpoints takes fractions of the run, e.g. 0,0.5,1; got {checkpoints!r}")
    require(all(0 <= f <= 1 for f in fractions), f"--checkpoints must lie in [0, 1], got {checkpoints!r}")
    folder = out or f"out/mechanism-{trainer}-{reward}"
    train_list, _, train_prompts = compare.split_prompts(prompts, "auto", folder)
    argv = [f"--reward={reward}", f"--prompts={train_prompts}", "--compile=off", *shlex.split(args), "--seed=0",
            f"--out={os.path.join(folder, 'baseline')}"]
    configs = {v: resolve(argv + flags) for v, flags in VARIANTS.items()}
    cfg = configs["plain"]
    epochs = sorted({round(f * cfg["epochs"]) for f in fractions})
    runs.check_run(os.path.join(folder, "baseline"), cfg)
    os.makedirs(folder, exist_ok=True)
    if train_prompts != prompts:
        runs.write_text(train_prompts, "".join(p + "\n" for p in train_list))
    states = {e: train_to(folder, argv, e) for e in epochs}  # first: the baseline run (a subprocess)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipelines.load_pipeline(cfg["model"], device=dev)
    reward_fn = rewards.load(reward, device=dev, **configurator.parse_options(cfg.get("reward_options", "")))
    success_fn = rewards.load("shapes_success", device=dev) if cfg["model"] == "shapes" else None
    clean = [explore.parse_phrases(p)[0] for p in train_list for _ in range(samples)]
    cells = {}
    for e in tqdm(epochs, desc="checkpoints", dynamic_ncols=True):
        if states[e] is not None:
            lora.load_state_dict(pipe.unet, states[e], source=f"{folder}/lora-e{e}.pt")
        scored = {}
        for variant, c in configs.items():
            with torch.no_grad():
                images = evaluation.sample_grid(
                    pipe, train_list, list(range(samples)), c["guidance"], c["num_steps"], c["eta"],
                    exploring=variant != "plain", w_low=c["w_low"], t_thres=c["t_thres"], explore_cfg=c["explore_cfg"],
                    explore_weights=c["explore_weights"], weight_max=c["weight_max"]).flatten(0, 1).to(dev)
                scored[variant] = (reward_fn(images, clean).float().cpu(),
                                   None if success_fn is None else success_fn(images, clean).float().cpu())
        cells[e] = {v: stats(r, s, scored["plain"][0], samples) for v, (r, s) in scored.items()}
    result = dict(trainer=trainer, reward=reward, prompt_set=prompts, prompts=train_list, samples=samples, args=args,
                  world=pooling.world_id(cfg["model"]), cells=cells,
                  sampling={k: cfg[k] for k in ("guidance", "num_steps", "eta", "t_thres", "weight_max")})
    runs.write_text(os.path.join(folder, "table.json"), json.dumps(result, indent=2) + "\n")
    md = table_markdown(result)
    runs.write_text(os.path.join(folder, "table.md"), md)
    print("\n" + md + f"\ntable: {folder}/table.md, {folder}/table.json")
    return result


if __name__ == "__main__":
    configurator.configure(globals())
    main()
