"""The run lifecycle: what every trainer does around its algorithm, written once.

A trainer's main() reads, with this module doing the parts that are not the algorithm:

    prompt_list = lifecycle.check(config)          # the common input checks (bad input costs nothing)
    ... the trainer's own checks ...
    run = lifecycle.start("ddpo", config, prompt_list)  # run folder, processes, resume checkpoint,
                                                   # model and reward (one-line errors), dashboards, fail-safe
    ... LoRA, optimizer; resume from run.checkpoint ...
    for epoch in run.epochs():                     # stop_after; the evaluation before any update
        ... the algorithm's numbered steps ...
        run.end_epoch(epoch, exploring, ...)       # evaluation, checkpoint, log, dashboards, the printed line
    run.finish(save_lora)                          # the LoRA weights, dashboards closed, processes parted

It sits just below the scripts (it loads models and rewards and evaluates with the sampling loop),
above the library and the rest of the plumbing. An `observer` (experiments/bench.py's timers) may
watch a run: `observer.loaded(run)` once the model and reward are loaded (it may wrap
run.reward_fn), `observer.epoch_end(rec, writing)` after each epoch's files are written (`writing`:
the seconds that took).
"""
import math
import os
import time

import torch

import lora
import pipelines
import prompt_sets
import rewards
import sampling
from plumbing import compiling, configurator, dashboards, distributed, evaluation, mixed_precision, runs
from plumbing.configurator import at_least, between, positive, require


def check(c):
    """The input checks every trainer shares, on its config `c`, before anything is loaded or
    written; each failure is one line naming the option. Returns the prompt list (loading it checks
    a prompt file's phrase marks here, not mid-run)."""
    require(c["reward"] in rewards.REWARDS, f"unknown reward {c['reward']!r}; known rewards: {', '.join(rewards.REWARDS)}")
    at_least(1, **{k: c[k] for k in ("num_steps", "epochs", "lora_rank", "eval_every", "eval_prompts", "eval_seeds",
                                     "eval_batch_size", "max_skips", "weight_max")})
    at_least(0, **{k: c[k] for k in ("guidance", "w_low", "t_thres", "weight_decay", "stop_after")})
    positive(lr=c["lr"], max_grad_norm=c["max_grad_norm"])
    between(0, 1, explore_frac=c["explore_frac"])
    between(0, 2**32 - 1, seed=c["seed"])
    distributed.check_device(c["device"])
    mixed_precision.check(c["precision"])
    compiling.check(c["compile"])
    dashboards.check(wandb_log=c["wandb_log"], tensorboard=c["tensorboard"])  # their packages are installed
    configurator.parse_options(c["reward_options"])
    return prompt_sets.load_prompts(c["prompts"])


def finite_mean(values):
    """The mean of the finite values, NaN if there are none (an epoch's log after skipped updates)."""
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


class Run:
    """One training run's surroundings: where it writes, which process this is, the model and the
    reward, the evaluation prompts, the fail-safe, and the history it resumes with. Made by start()."""

    def __init__(self, name, config, prompt_list, observer=None):
        c = self.config = config
        self.out = c["out"] = c["out"] or f"out/{name}-{c['reward']}{'-explore' if c['explore'] else ''}-s{c['seed']}"
        runs.check_run(self.out, c)  # a different config in this folder: refused before anything loads
        self.observer = observer

        # ---- processes: one per device under torchrun, gloo on CPU and NCCL on GPU ------------------
        self.ddp, self.rank, self.world, self.dev = distributed.setup(c["device"])
        self.master = self.rank == 0
        self.checkpoint = ck = runs.load_checkpoint(self.out, c)  # read now: a changed process count costs nothing
        if ck and ck.get("world_size", self.world) != self.world:
            raise SystemExit(f"error: {self.out} was trained with {ck['world_size']} processes and this run has "
                             f"{self.world}; the global batch and the random streams depend on it: resume with "
                             f"{ck['world_size']} (torchrun --nproc_per_node=N), or pass --out=<new folder>")

        # ---- the model and the reward: a bad one is one line, and leaves nothing on disk ------------
        try:
            pipelines.check_model(c["model"], c["revision"] or None)  # a typo fails at once, before the reward loads
            self.reward_fn = rewards.load(c["reward"], device=self.dev, **configurator.parse_options(c["reward_options"]))
            self.pipe = pipelines.load_pipeline(c["model"], device=self.dev, precision=c["precision"],
                                                revision=c["revision"] or None, variant=c["variant"] or None,
                                                t5=c["t5"])  # SD 3.5's T5 encoder (--no-t5: zeros for its tokens)
        except (ValueError, TypeError, rewards.RewardUnavailable) as e:
            raise SystemExit(f"error: {e}")
        T = self.pipe.scheduler.config.num_train_timesteps  # the last checks: they need the model's timesteps
        require(c["num_steps"] <= T, f"--num_steps must be <= the model's {T} training timesteps, got {c['num_steps']}")
        require(c["t_thres"] < T, f"--t_thres must be below the model's {T} training timesteps, got {c['t_thres']}")
        if ck and (why := lora.misfit(sampling.denoiser(self.pipe), ck["lora"])):  # another model, the same --model
            raise SystemExit(f"error: {self.out}/ckpt.pt was saved from another model than --model={c['model']} "
                             f"({why}); pass --out=<new folder> (or delete {self.out}) to start afresh")
        if self.master:  # only now: a bad reward, model, prompt set or checkpoint leaves nothing on disk
            runs.prepare_run(self.out, c)
        self.dash = dashboards.Dashboards(self.out, c, enabled=self.master)  # wandb / TensorBoard, if asked

        # ---- what the run resumes with, the evaluation prompts and the fail-safe ----------------------
        self.start_epoch, self.queries, self.history = 0, 0, []
        if ck:
            self.start_epoch, self.queries, self.history = ck["epoch"] + 1, ck["reward_queries"], ck["history"]
            if self.master:
                print(f"resuming {self.out} from epoch {self.start_epoch}")
        # evaluation: plain sampling (no exploration), fixed prompts and noise, the same in every run
        self.eval_list = prompt_sets.spread_subset(prompt_list, c["eval_prompts"])  # every colour, shape, ... once
        self.skips = runs.Skips(c["max_skips"], self.out, verbose=self.master)  # the fail-safe for NaN and inf
        if observer:
            observer.loaded(self)

    def resume(self, unet, optimizer):
        """Put the resume checkpoint's LoRA weights (checked against the UNet when the run started)
        and optimizer state back; returns the checkpoint, None for a fresh run."""
        if self.checkpoint:
            lora.load_state_dict(unet, self.checkpoint["lora"])
            optimizer.load_state_dict(self.checkpoint["optimizer"])
        return self.checkpoint

    def good_samples(self, rewards, chain_ok, prompts, epoch, what="sampling"):
        """The fail-safe before an update: which of the epoch's samples (every process's, so every
        rank answers the same) have a finite reward and a finite chain (`chain_ok`: latents and
        log-probs; a chain that went NaN can still score a finite reward, e.g. a JPEG's size). If any
        has not, the first one is named to the fail-safe (Skips), and the trainer skips the update."""
        good = torch.isfinite(rewards) & chain_ok
        if not good.all():
            i, c = int((~good).nonzero()[0]), self.config
            self.skips.skip((f"reward {c['reward']} returned {rewards[i].item()}" if chain_ok[i] else
                             f"{what} gave non-finite latents or log-probs (eta {c['eta']:g}, guidance {c['guidance']:g})")
                            + f" in epoch {epoch}", prompts=[prompts[i]])
        return good

    def evaluate(self, path, title):
        """The mean reward of plain sampling on the evaluation prompts and seeds (evaluation.evaluate)."""
        c = self.config
        return evaluation.evaluate(self.pipe, self.reward_fn, self.eval_list, c["guidance"], c["num_steps"], c["eta"],
                                   c["eval_seeds"], os.path.join(self.out, path), title, c["eval_batch_size"])

    def epochs(self):
        """The epochs this invocation runs (from the resume point; --stop_after ends it early). Before
        epoch 0, the model before any update is evaluated: where the evaluation curve starts.
        Every rank evaluates its share of the images (evaluation.evaluate); rank 0 prints and writes."""
        c = self.config
        for epoch in range(self.start_epoch, c["epochs"]):
            if c["stop_after"] and epoch - self.start_epoch >= c["stop_after"]:
                break
            if epoch == 0:
                self.eval_before = self.evaluate("eval_base.png", f"before training: plain sampling, guidance "
                                                                  f"{c['guidance']:g}")
                if self.master:
                    print(f"evaluation reward before training: {self.eval_before:.4f}")
            self.t0 = time.time()
            yield epoch

    def end_epoch(self, epoch, exploring, rewards, skipped, diagnostics, shown, checkpoint):
        """Close an epoch: its log record (the good samples' `rewards`, the trainer's `diagnostics`),
        the evaluation every eval_every epochs and at the end, the resume checkpoint (`checkpoint`: the
        trainer's state, e.g. LoRA and optimizer), log.jsonl and its plot, the dashboards, and the
        printed line (`shown`: the trainer's own fields). Only rank 0 writes."""
        c = self.config
        rec = dict(epoch=epoch, explore=exploring, reward_mean=rewards.mean().item(),
                   reward_std=rewards.std().item() if len(rewards) > 1 else float("nan"), reward_queries=self.queries,
                   **diagnostics, skipped_updates=skipped, seconds=0.0)
        if epoch == 0:
            rec["eval_before"] = self.eval_before
        if (epoch + 1) % c["eval_every"] == 0 or epoch == c["epochs"] - 1:  # every rank: its share (evaluation.py)
            rec["eval_reward"] = self.evaluate(f"eval_{epoch:04d}.png", f"epoch {epoch}: plain sampling, guidance "
                                                                        f"{c['guidance']:g}")
        rec["seconds"] = round(time.time() - self.t0, 2)
        self.history.append(rec)
        if self.master:
            t = time.perf_counter()
            runs.save_checkpoint(self.out, dict(checkpoint, epoch=epoch, reward_queries=self.queries,
                                                history=self.history, config=c, world_size=self.world))
            runs.write_log(self.out, self.history)
            writing = time.perf_counter() - t
            self.dash.log(rec)
            line = [f"epoch {epoch:3d}", f"reward {rec['reward_mean']:.4f} +- {rec['reward_std']:.4f}",
                    f"queries {self.queries}", shown]
            if exploring:
                line.append("explore")
            if skipped:
                line.append(f"skipped {skipped} updates")
            if "eval_reward" in rec:
                line.append(f"eval {rec['eval_reward']:.4f}")
            print(" | ".join(line + [f"{rec['seconds']:.1f}s"]))
            if self.observer:
                self.observer.epoch_end(rec, writing)

    def finish(self, save_lora):
        """The end of the run: `save_lora(folder)` writes the trained weights (rank 0), then the
        dashboards close and the processes part."""
        if self.master:
            save_lora(os.path.join(self.out, "lora"))
            print(f"done: {self.out} (LoRA weights in {self.out}/lora, log in {self.out}/log.jsonl, "
                  f"plot {self.out}/reward.png)")
        self.dash.close()
        distributed.teardown(self.ddp)


def start(name, config, prompt_list, observer=None):
    """Start (or resume) trainer `name`'s run of `config` (the trainer's resolved options; its "out"
    is filled in: out/<name>-<reward>[-explore]-s<seed> by default) on `prompt_list` (check's). See Run."""
    return Run(name, config, prompt_list, observer)
