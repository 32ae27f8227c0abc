"""The paper's experiment in miniature: does DiffExp exploration make reward fine-tuning more
sample-efficient? (Chae et al., AAAI 2025, Figure 1b: reward against the number of reward queries.)

One command trains a baseline arm and an `--explore` arm of one trainer over several seeds, with the
same budget of reward queries per arm (every run gets the same epochs and batch sizes), then draws
the reward curves with +-1 std bands over seeds and writes a table:

    python -m experiments.compare --trainer=ddpo                          # shapes world, 3 seeds per arm
    python -m experiments.compare --trainer=alignprop --ablation          # DiffExp's ablation, 4 arms (below)
    python -m experiments.compare --trainer=prdp                          # PRDP (train_prdp.py), the same experiment
    python -m experiments.compare --trainer=prdp --versus=out/compare-ddpo-shapes_aesthetic   # and against DDPO's runs
    python -m experiments.compare --trainer=ddpo --args="--epochs=12 --w_low=0"   # anything else: to the trainer
    python -m experiments.compare --trainer=ddpo --explore_args="--t_thres=900"   # another exploration setting
                                                                      # against the same baseline runs

Every run is an ordinary trainer run (`python train_<trainer>.py ... --seed=S --out=<folder>`,
a subprocess) in out/compare-<trainer>-<reward>/<arm>-s<seed>/. Re-running the same command
resumes: finished runs (a complete log.jsonl and LoRA weights) are skipped, unfinished ones are
re-run with the same command, which resumes from their checkpoint. Afterwards every run's final LoRA
samples a held-out prompt set plainly (constant guidance, unweighted prompts, fixed noise: the
images `python sample.py --lora=<run> ...` draws) and is scored with the same reward.

--ablation runs DiffExp's two parts separately: neither (the baseline), the CFG schedule only
(cfg_only), the prompt weighting only (weights_only), and both (explore); and both with w_low = 0,
the unconditional model on the noisy steps instead of the unguided conditional one (w_low0).

--baseline_only runs the baseline arm alone (with --versus: one trainer's plain runs against another's);
--arms=baseline,explore,w_low0 runs the arms named.

Adding seeds: re-run with a larger --seeds; the runs already finished are kept (the runs go seed by
seed, every arm's seed 0 first, so a stopped comparison holds whole pairs). The folder records the
weights it was run on (world.json: a shapes world's manifest hash) and refuses runs of other weights.
--pool=<folder>,... pools runs made elsewhere (another machine, another day, another folder): each
finished run there of the same name, world, training prompts and options is copied in and counted.

--versus=<another compare folder> sets each arm against the same arm of another comparison on the
same model (for a shapes world, the same weights: its manifest hash), reward and prompts, e.g.
PRDP's against DDPO's: unpaired differences with Welch's interval, which hold for any two trainers
(DDPO's and PRDP's runs of one seed draw the same prompts and noise when their sampling calls have
the same shape, e.g. 8 images a prompt, and then it is conservative; AlignProp's batches draw differently).

Outputs in the compare folder: reward.png (the curves), table.md and table.json, heldout.png (the
held-out images of every arm's first seed, with their diversity), logs/<run>.txt (each run's output);
with --explore_args, their names end in the arms' suffix (reward-t_thres900.png, ...).
"""
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import threading
import time

import torch

import explore
import lora
import pipelines
import prompt_sets
import rewards
import sampling
from plumbing import compiling, configurator, evaluation, grids, mixed_precision, runs
from experiments import pooling
from experiments.compare_stats import arm_differences, plot_curves, read_log, summarise, table_markdown
from plumbing.configurator import at_least, require  # the input checks

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python -m experiments.compare --help` lists them)
trainer = "ddpo"             # which trainer: ddpo, alignprop or prdp
model = "shapes"             # passed to the trainer: 'shapes', a hub id, or a local diffusers folder
revision = ""                # passed to the trainer: a hub --model's branch, tag or commit ("" = main)
variant = ""                 # passed to the trainer: weight files of this variant, e.g. fp16 ("" = plain)
reward = "shapes_aesthetic"  # passed to the trainer (and scores the held-out images)
prompts = "shapes"           # training prompt set or file (minus the held-out prompts, see heldout)
seeds = 3                    # runs per arm, seeds 0..seeds-1
ablation = False             # also the arms cfg_only (CFG schedule only) and weights_only (prompt weighting only)
baseline_only = False        # the baseline arm alone: one trainer's plain runs, e.g. against another's with --versus
arms = ""                    # these arms only, comma-separated (e.g. baseline,explore,w_low0); "" = as the two flags above say
args = ""                    # other trainer options, one string: --args="--epochs=12 --lr=3e-4"
explore_args = ""            # trainer options for the exploring arms only, e.g. "--t_thres=900": their arms
                             # are named after them, the baseline's runs stay the same and are reused
heldout = "auto"             # held-out prompts: a set or file; auto: unseen_animals for animals, the dark background
                             # for shapes_rare, else every 7th prompt
heldout_prompts = 12         # at most this many held-out prompts are sampled (evenly spaced)
heldout_seeds = 4            # images per held-out prompt (initial-noise seeds 0..n-1, the same for every run; >= 2 for diversity)
metrics = "auto"             # also score the held-out images with these rewards (comma-separated), to see
                             # over-optimisation; auto: shapes_success,shapes_correct,shapes_appeal on the shapes world
jobs = 0                     # trainer processes at once; 0 = one per 2 cores (torch threads are split between them)
threads = 0                  # torch threads per trainer process; 0 = the cores split between the jobs (set 1 to leave
                             # cores free for other work: oversubscribed torch threads crawl)
compile = "auto"             # torch.compile every run's UNet: auto (where the machine can, CUDA or a C++ compiler, except
                             # DDPO/PRDP in bf16/fp16), on, off; the runs share the compiler's cache (plumbing/compiling.py)
out = ""                     # compare folder; default out/compare-<trainer>-<reward>
pool = ""                    # other compare folders (comma-separated, e.g. copied from another machine) whose finished
                             # runs join this comparison: the same world, training prompts and resolved options (but
                             # out and compile); they are copied in, so --seeds can be raised over days and machines
versus = ""                  # another finished compare folder on the same model, reward and prompts (e.g. the other
                             # trainer's): each arm's final numbers against its same arm, unpaired (Welch's interval)
# ------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the trainers are
TRAINERS = {"ddpo": "train_ddpo", "alignprop": "train_alignprop", "prdp": "train_prdp"}
# arm -> trainer flags. "neither" is the baseline: exploring with both parts off samples exactly
# like it, so it is not run twice.
ARMS = {"baseline": [], "explore": ["--explore"]}
ABLATION_ARMS = {"cfg_only": ["--explore", "--explore_weights=false"],
                 "weights_only": ["--explore", "--explore_cfg=false"],
                 "w_low0": ["--explore", "--w_low=0"]}  # the unconditional model on the noisy steps
# compare sets these per run; letting --args set them would break the comparison or the resume
OWN_KEYS = ("model", "revision", "variant", "reward", "prompts", "seed", "out", "explore", "explore_cfg", "explore_weights",
            "stop_after", "compile")
HOLDOUT_STRIDE = 7  # auto hold-out: prompts 0, 7, 14, ... (7 is coprime to the shapes world's 6x4x3 grid)


def explore_tag():
    """'-t_thres900' for --explore_args="--t_thres=900": the suffix of the exploring arms' names and
    of this comparison's outputs ('' without explore_args)."""
    return "".join("-" + a.lstrip("-").replace("=", "") for a in shlex.split(explore_args))


def held_out_split(prompt_list):
    """(training prompts, held-out prompts) for --heldout=auto on a set without its own held-out
    set: every 7th prompt is held out. On the shapes world (72 captions, colour x shape x background)
    that holds out 11 combinations whose colours, shapes and backgrounds all still occur in training:
    the evaluation asks whether the fine-tuning generalises to unseen combinations."""
    if len(prompt_list) < 2:
        raise SystemExit(f"error: the prompt set {prompts!r} has {len(prompt_list)} prompt; holding some out "
                         "needs at least 2, or pass --heldout=<prompt set or file>")
    held = prompt_list[::HOLDOUT_STRIDE]
    return [p for p in prompt_list if p not in held], held


def split_prompts(prompt_set, held_set, folder):
    """(training prompts, held-out prompts, what the runs' --prompts is) for --prompts=prompt_set and
    --heldout=held_set: auto holds out unseen_animals for animals, every rare pair's dark-background
    caption for shapes_rare (the hard task: every rare pair on an unseen background), else every 7th
    prompt; the runs then train on <folder>/train_prompts.txt, written before they start."""
    train_list = prompt_sets.load_prompts(prompt_set)
    if held_set != "auto":
        return train_list, prompt_sets.load_prompts(held_set), prompt_set
    if prompt_set == "animals":
        return train_list, prompt_sets.load_prompts("unseen_animals"), prompt_set
    if prompt_set == "shapes_rare":
        held = [p for p in train_list if "(dark)" in p]
        train_list = [p for p in train_list if p not in held]
    else:
        train_list, held = held_out_split(train_list)
    return train_list, held, os.path.join(folder, "train_prompts.txt")


def trainer_config(argv):
    """The trainer's config for `argv`, resolved by the trainer's own defaults and parser, exactly as
    the trainer writes it to config.json, and checked by the trainer's own checks (its
    main(check_only=True)): a bad key or value in --args fails here, with the trainer's message,
    before anything runs."""
    try:
        module = configurator.fresh(TRAINERS[trainer], argv)
        config = module.config
        # the held-out split's training file is written later: check the set it comes from
        module.config = dict(config, prompts=prompts)
        module.main(check_only=True)
    except SystemExit as e:
        raise SystemExit(f"error: in --args ({TRAINERS[trainer]}.py): {str(e).removeprefix('error: ')}")
    return config


def plan():
    """Check the input and return the runs: [dict(name, arm, seed, dir, argv, config)], plus the
    training and held-out prompts and the --versus comparison's table (None without it). Nothing is
    written."""
    require(trainer in TRAINERS, f"--trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")
    at_least(1, seeds=seeds, heldout_prompts=heldout_prompts)
    at_least(2, heldout_seeds=heldout_seeds)  # the diversity column compares a prompt's seeds
    at_least(0, jobs=jobs)
    compiling.check(compile)
    require(reward in rewards.REWARDS, f"unknown reward {reward!r}; known rewards: {', '.join(rewards.REWARDS)}")
    if bad := [m for m in metrics.split(",") if metrics != "auto" and m.strip() and m.strip() not in rewards.REWARDS]:
        raise SystemExit(f"error: --metrics: unknown reward {bad[0].strip()!r}; known rewards: {', '.join(rewards.REWARDS)}")
    extra, explore_extra = shlex.split(args), shlex.split(explore_args)
    require(not (baseline_only and (ablation or explore_extra)),
            "--baseline_only runs no exploring arm, so it takes neither --ablation nor --explore_args")
    at_least(0, threads=threads)
    chosen = [a.strip() for a in arms.split(",") if a.strip()]
    known = dict(ARMS, **ABLATION_ARMS)
    if bad := [a for a in chosen if a not in known]:
        raise SystemExit(f"error: --arms: unknown arm {bad[0]!r}; the arms are {', '.join(known)}")
    require(not (chosen and (ablation or baseline_only)), "--arms names the arms itself; drop --ablation and --baseline_only")
    for name, given in (("args", extra), ("explore_args", explore_extra)):
        for a in given:
            key = a[2:].partition("=")[0].replace("-", "_") if a.startswith("--") else ""
            if key in OWN_KEYS or (key.startswith("no_") and key[3:] in OWN_KEYS):
                raise SystemExit(f"error: --{name} must not set --{key}: experiments/compare.py sets it for every run "
                                 f"(use compare's own --{key.removeprefix('no_')} where it has one)")
    try:
        pipelines.check_model(model, revision or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    folder = out or f"out/compare-{trainer}-{reward}"
    train_list, held, train_prompts = split_prompts(prompts, heldout, folder)
    n = min(heldout_prompts, len(held))
    held = [held[i * len(held) // n] for i in range(n)]  # evenly spaced
    # compiling, decided once for every run (plumbing/compiling.py): the runs' UNet dtype comes from their options
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = mixed_precision.unet_dtype(trainer_config([f"--model={model}", *extra]).get("precision", "auto"), dev)
    run_compile = "on" if compiling.wanted(compile, dev, dtype, replays=trainer in ("ddpo", "prdp"), many_runs=True) else "off"
    arm_flags = dict(ARMS, **(ABLATION_ARMS if ablation else {}))
    if baseline_only:
        arm_flags = {"baseline": ARMS["baseline"]}
    if chosen:
        arm_flags = {a: known[a] for a in known if a in chosen}  # in the usual order
    if explore_extra:
        arm_flags = {arm if arm == "baseline" else arm + explore_tag(): flags + ([] if arm == "baseline" else explore_extra)
                     for arm, flags in arm_flags.items()}
    run_list = []
    for arm, flags in arm_flags.items():
        for s in range(seeds):
            name, run_dir = f"{arm}-s{s}", os.path.join(folder, f"{arm}-s{s}")
            argv = [f"--model={model}", f"--revision={revision}", f"--variant={variant}", f"--reward={reward}",
                    f"--prompts={train_prompts}", f"--compile={run_compile}", *extra,
                    f"--seed={s}", f"--out={run_dir}", *flags]
            run_list.append(dict(name=name, arm=arm, seed=s, dir=run_dir, argv=argv, flags=flags,
                             config=trainer_config(argv)))
    if train_prompts != prompts and not pooling.same_prompts(train_prompts, train_list):
        raise SystemExit(f"error: {train_prompts} holds other training prompts than --prompts={prompts} "
                         f"minus its held-out prompts; pass --out=<new folder> or delete {folder}")
    for r in run_list:  # a folder holding a run with other options: the trainer would refuse it later
        runs.check_run(r["dir"], r["config"])
    pooling.check_world(folder, model)
    pooled = pooling.pooled_runs(pool, run_list, train_list, model) if pool else []
    other = other_table(held, heldout_sampling(run_list)) if versus else None  # checked before any training
    return folder, run_list, train_list, train_prompts, held, other, pooled


def heldout_sampling(run_list):
    """How the held-out images are sampled: the runs' guidance, DDIM steps and eta."""
    return {k: run_list[0]["config"][k] for k in ("guidance", "num_steps", "eta")}


def other_table(held, sampling_settings):
    """The --versus comparison's table.json, checked: its numbers must measure the same thing (the
    same model, reward, training and held-out prompts, held-out images sampled the same way) for the
    differences to mean anything."""
    path = os.path.join(versus, "table.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: --versus={versus} holds no table.json; run that comparison to its end first")
    with open(path) as f:
        other = json.load(f)
    for key, what in (("heldout_sampling", "how its held-out images were sampled"), ("world", "its model's weights")):
        if key not in other:
            raise SystemExit(f"error: --versus={versus}: its table.json predates the record of {what}; re-run that "
                             "comparison's command (it resumes and only rewrites its table)")
    for key, mine in (("model", model), ("world", pooling.world_id(model)), ("reward", reward), ("prompts", prompts),
                      ("heldout", held), ("heldout_sampling", sampling_settings)):
        if other.get(key) != mine:
            raise SystemExit(f"error: --versus={versus} was run with another {key} ({other.get(key)!r}, here {mine!r}); "
                             "its numbers are not comparable with this comparison's")
    return other


def time_left(run_seconds, total, n_jobs):
    """How long the `total - len(run_seconds)` runs not yet finished will take, `n_jobs` at a time, at
    the finished runs' mean wall time: '41 min', or '6.8 h' from 90 minutes on."""
    left = sum(run_seconds) / len(run_seconds) * (total - len(run_seconds)) / n_jobs
    return f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"


def train_all(folder, run_list):
    """Run every unfinished run's trainer command, `jobs` at a time; return how many ran. Each run's
    output goes to logs/<run>.txt; here, one line per finished epoch (read from its log.jsonl). On a
    failure or Ctrl-C the runs under way are stopped (each resumes from its last checkpoint)."""
    # seed by seed (every arm's seed 0, then seed 1, ...): stopped part-way, the finished runs are whole pairs
    todo = sorted((r for r in run_list if not pooling.finished(r)), key=lambda r: r["seed"])
    for r in run_list:
        if r not in todo:
            print(f"{r['name']}: finished earlier, skipped", flush=True)
    n_jobs = min(jobs or max(1, (os.cpu_count() or 1) // 2), max(1, len(todo)))
    n_threads = threads or max(1, (os.cpu_count() or 1) // n_jobs)  # share the cores: oversubscribed torch threads crawl
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads), MKL_NUM_THREADS=str(n_threads))
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    script = os.path.join(ROOT, TRAINERS[trainer] + ".py")
    if todo:
        print(f"running {len(todo)} of {len(run_list)} runs, {n_jobs} at a time ({n_threads} torch threads each); "
              f"each is: python {TRAINERS[trainer]}.py {shlex.join(todo[0]['argv'])}", flush=True)
    running, stop = set(), threading.Event()  # processes under way; set: start no more

    def train(r):  # in a worker thread: one trainer process, start to end
        if stop.is_set():
            return r, None, 0.0
        start, seen = time.time(), len(read_log(r["dir"]))
        with open(os.path.join(folder, "logs", r["name"] + ".txt"), "a") as log:
            log.write(f"$ {sys.executable} {script} {shlex.join(r['argv'])}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, script, *r["argv"]], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.add(proc)
            print(f"{r['name']}: started" + (f", resuming after epoch {seen - 1}" if seen else ""), flush=True)
            while True:
                code = proc.poll()
                history = read_log(r["dir"])
                for h in history[seen:]:
                    print(f"{r['name']}: epoch {h['epoch'] + 1}/{r['config']['epochs']}, reward {h['reward_mean']:.4f}, "
                          f"{h['reward_queries']} queries{', exploring' if h['explore'] else ''}", flush=True)
                seen = max(seen, len(history))
                if code is not None:
                    break
                time.sleep(0.5)
            running.discard(proc)
        return r, code, time.time() - start

    pool, failed, took = concurrent.futures.ThreadPoolExecutor(n_jobs), None, []
    try:
        futures = [pool.submit(train, r) for r in todo]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            r, code, seconds = future.result()
            if code:
                failed = (r, code)
                break
            took.append(seconds)
            left = f"; about {time_left(took, len(todo), n_jobs)} left" if done < len(todo) else ""
            print(f"[{done}/{len(todo)}] {r['name']}: done in {seconds:.0f} s{left}", flush=True)
    finally:  # a failure or Ctrl-C: start nothing more and stop the runs under way
        stop.set()
        for proc in list(running):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        r, code = failed
        path = os.path.join(folder, "logs", r["name"] + ".txt")
        with open(path) as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        raise SystemExit(f"error: run {r['name']} failed (exit code {code}): {lines[-1] if lines else ''} "
                         f"(full output: {path}); fix it and re-run the same command to resume")
    return len(todo)


# ------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts: each run's final LoRA, sampled plainly with fixed noise

def sample_heldout(pipe, held, cfg):
    """Images [P, S, 3, H, W] of the held-out prompts, exactly those that
    `python sample.py --prompts=<file> --num_seeds=S --guidance=G --steps=T --eta=E` draws (its grid
    function, with the run's guidance, steps and eta)."""
    with torch.no_grad():
        return evaluation.sample_grid(pipe, held, list(range(heldout_seeds)), cfg["guidance"], cfg["num_steps"],
                                      cfg["eta"])


def metric_names(cfg):
    """The extra held-out scores: --metrics, with auto resolved (the shapes world's ground truth)."""
    names = ("shapes_success,shapes_correct,shapes_appeal" if cfg["model"] == "shapes" else "") if metrics == "auto" else metrics
    return [m.strip() for m in names.split(",") if m.strip() and m.strip() != cfg["reward"]]


def evaluate(pipe, reward_fn, held, cfg, lora_dir, cache, metric_fns={}):
    """Held-out reward, the `metric_fns` scores and diversity of the pipeline with the LoRA in
    `lora_dir` (None: the pretrained model), cached in `cache` (with uint8 images for the figure)
    until the settings or the LoRA weights change."""
    weights = os.path.join(lora_dir, "pytorch_lora_weights.safetensors") if lora_dir else None
    settings = dict(prompts=held, seeds=heldout_seeds, guidance=cfg["guidance"], num_steps=cfg["num_steps"],
                    eta=cfg["eta"], reward=cfg["reward"], metrics=sorted(metric_fns),
                    weights_mtime=os.path.getmtime(weights) if weights else None)
    if os.path.exists(cache):
        c = torch.load(cache, weights_only=True)  # tensors and plain data only
        if c["settings"] == settings:
            return c
    if weights:
        lora.load(sampling.denoiser(pipe), weights)
    elif lora.layers(sampling.denoiser(pipe)):
        raise RuntimeError("evaluate the pretrained model before any LoRA is loaded")
    images = sample_heldout(pipe, held, cfg)
    clean = [explore.parse_phrases(p)[0] for p in held for _ in range(heldout_seeds)]
    flat = images.flatten(0, 1).to(sampling.denoiser(pipe).device)
    with torch.no_grad():
        r = reward_fn(flat, clean).float().cpu()
        scores = {m: fn(flat, clean).float().mean().item() for m, fn in metric_fns.items()}
    c = dict(settings=settings, reward=r.mean().item(), metrics=scores, diversity=grids.diversity(images),
             images=(images * 255).round().to(torch.uint8))
    runs.atomic_write(cache, lambda tmp: torch.save(c, tmp))
    return c


def evaluate_all(folder, run_list, held, trained):
    """Evaluate every run (and the pretrained model) on the held-out prompts and on `trained`, a
    subset of the training prompts. Returns two dicts, run name -> evaluate()'s result."""
    cfg = run_list[0]["config"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reward_fn = rewards.load(cfg["reward"], device=dev, **configurator.parse_options(cfg.get("reward_options", "")))
    metric_fns = {m: rewards.load(m, device=dev) for m in metric_names(cfg)}
    pipe = pipelines.load_pipeline(cfg["model"], device=dev, precision=cfg.get("precision", "auto"),  # as the runs
                                   revision=cfg["revision"] or None, variant=cfg["variant"] or None, t5=cfg.get("t5", True))
    print(f"held-out evaluation: {len(held)} prompts x {heldout_seeds} seeds, guidance {cfg['guidance']:g}, "
          f"{cfg['num_steps']} steps, eta {cfg['eta']:g}", flush=True)
    results = {"pretrained": evaluate(pipe, reward_fn, held, cfg, None, os.path.join(folder, "pretrained_heldout.pt"),
                                      metric_fns)}
    on_trained = {"pretrained": evaluate(pipe, reward_fn, trained, cfg, None, os.path.join(folder, "pretrained_trained.pt"),
                                         metric_fns)}
    for r in run_list:
        lora_dir = os.path.join(r["dir"], "lora")
        results[r["name"]] = evaluate(pipe, reward_fn, held, cfg, lora_dir, os.path.join(r["dir"], "heldout.pt"), metric_fns)
        on_trained[r["name"]] = evaluate(pipe, reward_fn, trained, cfg, lora_dir, os.path.join(r["dir"], "trained.pt"),
                                         metric_fns)
        print(f"{r['name']}: held-out reward {results[r['name']]['reward']:.4f}, "
              f"diversity {results[r['name']]['diversity']:.4f}", flush=True)
    return results, on_trained


def main():
    t0 = time.time()
    folder, run_list, train_list, train_prompts, held, other, pooled = plan()
    os.makedirs(folder, exist_ok=True)
    world = dict(model=model, world=pooling.world_id(model))
    runs.write_text(os.path.join(folder, "world.json"), json.dumps(world) + "\n")
    if train_prompts != prompts:  # the auto hold-out: the runs train on the rest of the set
        text = "".join(p + "\n" for p in train_list)
        runs.write_text(train_prompts, text)
    with open(os.path.join(folder, "heldout_prompts.txt"), "w") as f:  # for `sample.py --prompts=`
        f.write("".join(p + "\n" for p in held))
    pooling.copy_pooled(pooled)
    ran = train_all(folder, run_list)
    print(f"training: {ran} runs ran, {len(run_list) - ran} finished earlier", flush=True)
    trained = prompt_sets.spread_subset(train_list, heldout_prompts)
    evals, trained_evals = evaluate_all(folder, run_list, held, trained)
    summary = dict(trainer=trainer, model=model, world=pooling.world_id(model), reward=reward, prompts=prompts,
                   args=args, seeds=seeds, reward_queries=read_log(run_list[0]["dir"])[-1]["reward_queries"],
                   heldout=held, heldout_seeds=heldout_seeds, heldout_sampling=heldout_sampling(run_list),
                   pretrained={k: evals["pretrained"][k] for k in ("reward", "metrics", "diversity")},
                   trained=trained, pretrained_trained={k: trained_evals["pretrained"][k] for k in ("reward", "metrics")},
                   arms=summarise(run_list, evals, trained_evals), runs_ran=ran)
    summary["train_seconds"] = sum(a["train_seconds"] for a in summary["arms"].values())
    if other:
        summary["versus"] = dict(folder=versus, trainer=other["trainer"], seeds=other["seeds"],
                                 reward_queries=other["reward_queries"], arms=arm_differences(summary, other),
                                 curves={name: {k: a[k] for k in ("curve", "train_curve")}
                                         for name, a in other["arms"].items() if name in summary["arms"]})
    summary["wall_seconds"] = time.time() - t0
    tag = explore_tag()  # a comparison of another exploration setting keeps its own outputs
    plot_curves(summary, os.path.join(folder, f"reward{tag}.png"))
    # the held-out images: one block per arm (its first seed's run), rows = prompts, columns = seeds
    blocks = [evals["pretrained"]] + [evals[f"{arm}-s0"] for arm in summary["arms"]]
    titles = ["pretrained"] + list(summary["arms"])
    grids.save_grid([b["images"].float() / 255 for b in blocks], [explore.parse_phrases(p)[0] for p in held],
                     os.path.join(folder, f"heldout{tag}.png"),
                     titles=[f"{t}: diversity {b['diversity']:.3f}, reward {b['reward']:.3f}" for t, b in zip(titles, blocks)],
                     seeds=list(range(heldout_seeds)))
    text = json.dumps(summary, indent=2) + "\n"
    runs.write_text(os.path.join(folder, f"table{tag}.json"), text)
    md = table_markdown(summary)
    runs.write_text(os.path.join(folder, f"table{tag}.md"), md)
    print("\n" + md)
    print(f"figures: {folder}/reward{tag}.png, {folder}/heldout{tag}.png; table: {folder}/table{tag}.md, {folder}/table{tag}.json")
    return summary


if __name__ == "__main__":
    configurator.configure(globals())
    main()
