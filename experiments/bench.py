"""Where the time goes: one training epoch of each trainer, broken into its parts, and sampling speed.

    python -m experiments.bench                                   # the shapes world, both trainers, CPU
    python -m experiments.bench --trainers=ddpo --ddpo_args="--sample_batch_size=8 --explore"
    python -m experiments.bench --trainers=prdp --batch_sizes=    # PRDP's epoch alone

1. Each trainer runs for real (its own main(), in this process, in a temporary folder) for `warmup`
   + `epochs` epochs, watched through the observer its run takes (plumbing/lifecycle.py: told when
   the model and reward are loaded and when each epoch's files are written). Before it starts, the
   library's and torch's functions it calls are wrapped with timers (time.perf_counter):
   sampling.rollout and encode_prompts (sampling), guided_eps and ddim_step (sampling without
   gradient, training forward with it), sampling.replay (PRDP's replay of the recorded steps:
   training forward even without gradient, the reference model's log-probs and the recomputation
   before each update after the first), decode_latents (decoding), the reward (the run's reward
   function, wrapped once loaded), torch.autograd.backward (training backward), clip_grad_norm_ and
   optimizer.step (optimizer). The trainers' own code is not touched: their losses (DDPO's
   ppo_loss, PRDP's rdp_loss: a few tensor ops) fall into the overhead. A section's time excludes
   the sections nested in it (rollout's decode counts as decoding), so the sections never overlap
   and overhead = epoch wall time - their sum. The epoch wall time is the time between the ends of
   two consecutive epochs, so it includes writing the checkpoint, the log and its plot (the seconds
   the run reports for that, shown as the part of the overhead they are). On a GPU a section's
   boundaries are CUDA events recorded in the stream and read once per epoch: synchronising at
   every boundary would make the CPU wait for the GPU there, serialising the very launches and
   kernels being timed. A section is then the GPU stream's time between its boundaries, and the
   epoch's peak GPU memory is torch.cuda.max_memory_allocated.
2. The overhead ratio: epoch wall time / the time of the UNet evaluations the epoch performs
   (counted with a hook on the UNet: batch shapes and whether they carry gradient), each timed
   alone with a pure UNet benchmark of the same shapes (forward, or forward+backward). 1.0 would
   mean that nothing but the unavoidable UNet work takes any time.
3. Sampling throughput (images/s, DDIM + VAE decode) with classifier-free guidance batched (one
   UNet call on 2B latents per step, as sampling.guided_eps does) and unbatched (two calls on B).
4. AlignProp's truncation (--truncations=1,10,all): peak memory and seconds per update for each K,
   with and without gradient checkpointing. Each setting is a separate train_alignprop.py process,
   so its peak memory is its own: resident memory (VmHWM) on a CPU, torch.cuda.max_memory_allocated
   on a GPU, each read by the process itself as it exits.
5. --sd_memory, --sdxl_memory, --sd3_memory: an estimate of the GPU memory the SD 1.5, SDXL (docs/gpu.md)
   and SD 3.5 (docs/sd3.md) recipes need with --precision=bf16, measured on the CPU by experiments/gpu_memory.py.
6. --ratio_noise: how far DDPO's first PPO ratio is from 1 when the log-probs recorded while
   sampling and their recomputation in training come from UNet calls that round differently:
   bf16 at two batch sizes (do this machine's kernels depend on the batch? the trainers sample with
   training's batch in case they do), and bf16 against fp32 (what any difference in rounding costs).
7. With --compiled (the default), each trainer's epoch of 1. again with its UNet compiled
   (--compile=on, plumbing/compiling.py): the seconds per section and the speed-up over eager, and the time to
   the end of the first epoch with an empty compiler cache and with the cache that run filled.

Prints markdown tables (and writes them as JSON with --json_out). 4., 6. and the tables are in
experiments/bench_parts.py; 1.-3. and 7., here.
"""
import contextlib
import functools
import importlib
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from unittest import mock

import torch

import pipelines
import sampling
from plumbing import configurator, mixed_precision
from experiments import bench_parts, gpu_memory
from plumbing.configurator import at_least, require  # the input checks

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python -m experiments.bench --help` lists them)
model = "shapes"             # 'shapes', a hub id, or a local diffusers folder (given to both trainers)
revision = ""                # a hub --model's branch, tag or commit ("" = main), given to the trainers too
variant = ""                 # weight files of this variant, e.g. fp16 ("" = plain), given to the trainers too
trainers = "ddpo,alignprop"  # which trainers to time, comma-separated: ddpo, alignprop, prdp
ddpo_args = ""               # other train_ddpo.py options, one string: "--sample_batch_size=8 --explore"
alignprop_args = ""          # other train_alignprop.py options, one string
prdp_args = ""               # other train_prdp.py options, one string
warmup = 1                   # trainer epochs run before the timed ones (first calls allocate and cache)
epochs = 1                   # timed trainer epochs (averaged)
repeats = 3                  # timed repetitions per pure-UNet shape and per throughput point (median / total)
batch_sizes = "1,2,4,8,16,32"  # sampling throughput batch sizes
num_steps = 20               # DDIM steps for the throughput measurement
guidance = 5.0               # CFG scale for the throughput measurement
truncations = ""             # AlignProp K values for the memory/time table, e.g. "1,10,all" ("" = skip)
sd_memory = False            # also estimate the SD 1.5 GPU recipes' memory from CPU measurements (5.; minutes, < 7 GB RAM)
sdxl_memory = False          # the same for the SDXL recipes (5.; minutes, < 7 GB RAM)
sd3_memory = False           # the same for the SD 3.5 Medium recipes (5.; minutes, < 7 GB RAM)
ratio_noise = False          # also measure DDPO's first-step ratio under bf16 rounding differences (6.)
compiled = True              # also time each trainer with its UNet compiled, with a cold and a warm compiler cache (7.)
json_out = ""                # also write all results as JSON to this file
# ------------------------------------------------------------------------------------------------

SECTIONS = ["sampling", "decoding", "reward", "train forward", "train backward", "optimizer", "overhead"]
TRAINER_MODULES = {"ddpo": "train_ddpo", "alignprop": "train_alignprop", "prdp": "train_prdp"}
NOT_IN_ARGS = ("model", "revision", "variant", "out", "epochs", "stop_after", "eval_every")  # bench sets these

# ------------------------------------------------------------------------------------------------
# Exclusive section timers: a stack of open sections; a section's time excludes its children's.
# A boundary is a mark: the clock on a CPU, a CUDA event recorded in the stream on a GPU. Closed
# sections wait in _closed until settle() reads their marks, once per epoch.

_times = defaultdict(float)
_stack = []  # open sections: [name, start mark, [(start, end) of each child closed so far]]
_closed = []  # closed sections: (name, start, end, children), not yet in _times


def _cuda():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync():  # on a GPU, time the work, not its asynchronous launch
    if _cuda():
        torch.cuda.synchronize()


def _mark():
    if torch.cuda.is_available():  # events from the first mark on: a section's two marks are of one kind
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(start, end):
    return start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start


def _enter(name):
    _stack.append([name, _mark(), []])


def _leave():
    name, start, children = _stack.pop()
    end = _mark()
    _closed.append((name, start, end, children))
    if _stack:
        _stack[-1][2].append((start, end))


def settle():
    """Wait for the GPU once, then add every closed section's exclusive time to _times."""
    _sync()
    for name, start, end, children in _closed:
        _times[name] += _seconds(start, end) - sum(_seconds(a, b) for a, b in children)
    _closed.clear()


def timed(section, fn):
    """`fn`, its time added to `section` (a name, or a function returning one at call time)."""
    @functools.wraps(fn)  # keeps the attributes too (a reward's .name and .differentiable)
    def wrapper(*a, **k):
        _enter(section() if callable(section) else section)
        try:
            return fn(*a, **k)
        finally:
            _leave()
    return wrapper


def by_grad():
    """The same UNet call is sampling without gradient and training with it; inside a training
    section (PRDP's replay of recorded steps) a call without gradient is training work too."""
    return "train forward" if torch.is_grad_enabled() or (_stack and _stack[-1][0] == "train forward") else "sampling"


# ------------------------------------------------------------------------------------------------
# 1. A real trainer epoch, timed

def model_args():
    """The trainer options that say which model bench runs: its own --model, --revision, --variant."""
    return [f"--model={model}", f"--revision={revision}", f"--variant={variant}"]


@contextlib.contextmanager
def library_timed():
    """The library's and torch's functions a trainer calls (by their module's name:
    sampling.rollout, torch.autograd.backward, ...) and optimizer.step, timed within the block; the
    originals are back after it, and the timers' books empty."""
    sections = [(sampling, "rollout", "sampling"), (sampling, "encode_prompts", "sampling"),
                (sampling, "guided_eps", by_grad), (sampling, "ddim_step", by_grad),
                (sampling, "decode_latents", "decoding"), (sampling, "replay", "train forward"),
                (torch.autograd, "backward", "train backward"), (torch.nn.utils, "clip_grad_norm_", "optimizer")]
    optim = importlib.import_module("torch.optim.optimizer")
    with contextlib.ExitStack() as undo:  # undone in reverse order: the books are emptied last
        for books in (_times, _stack, _closed):
            undo.callback(books.clear)
        for obj, attr, section in sections:
            undo.enter_context(mock.patch.object(obj, attr, timed(section, getattr(obj, attr))))
        undo.callback(optim.register_optimizer_step_pre_hook(lambda *a: _enter("optimizer")).remove)
        undo.callback(optim.register_optimizer_step_post_hook(lambda *a: _leave()).remove)
        _times.clear()
        yield


class Watcher:
    """What watches a trainer's run (its observer, plumbing/lifecycle.py): once the model and reward
    are loaded it counts the UNet's calls (with `count_calls`: a hook would be traced into a
    compiled graph, so the eager run counts them) and times the reward; at the end of each epoch it
    closes the epoch's books into `marks`."""

    def __init__(self, count_calls):
        self.count_calls, self.calls, self.marks, self.pipe, self.hook = count_calls, [], [], None, None

    def loaded(self, run):
        self.pipe = run.pipe
        if self.count_calls:
            self.hook = sampling.denoiser(run.pipe).register_forward_pre_hook(self.count_unet_call, with_kwargs=True)
        run.reward_fn = timed("reward", run.reward_fn)  # the trainer reads run.reward_fn after this

    def count_unet_call(self, unet, args, kwargs):
        x, emb = args[0] if args else kwargs["sample"], kwargs["encoder_hidden_states"]
        self.calls.append((tuple(x.shape), tuple(emb.shape), torch.is_grad_enabled()))

    def epoch_end(self, rec, writing):
        """The epoch's sections (with `writing`, the seconds its checkpoint and log took), UNet
        calls, log record (`rec`: its seconds, reward queries, diagnostics) and peak GPU memory."""
        settle()
        _times["writing"] += writing
        self.marks.append(dict(t=time.perf_counter(), times=dict(_times), calls=Counter(self.calls), log=dict(rec),
                               logged=rec["seconds"], queries=rec["reward_queries"],
                               gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if _cuda() else None))
        if _cuda():
            torch.cuda.reset_peak_memory_stats()  # the next epoch's peak is its own
        _times.clear()
        self.calls.clear()


def time_trainer(name, extra, compiled=False):
    """Run trainer `name` for warmup + epochs epochs, timed. Returns the timed epochs' sections,
    wall times and UNet calls, the pipeline, and the config, and the time from the start to the end
    of the first epoch (loading, the evaluation before training, and with `compiled`, the
    compilation of every graph the epoch needs)."""
    module = importlib.reload(importlib.import_module(TRAINER_MODULES[name]))
    out = tempfile.mkdtemp(prefix=f"bench-{name}-")
    argv = [*model_args(), *extra, f"--out={out}", "--epochs=1000000",  # no last-epoch evaluation
            f"--stop_after={warmup + epochs}", "--eval_every=1000000", f"--compile={'on' if compiled else 'off'}"]
    watcher = Watcher(count_calls=not compiled)
    try:
        with library_timed():
            module.config = configurator.configure(vars(module), argv)
            start = time.perf_counter()
            module.main(observer=watcher)
    finally:
        if watcher.hook:
            watcher.hook.remove()
        shutil.rmtree(out, ignore_errors=True)
    marks, timed_marks = watcher.marks, watcher.marks[warmup:]
    walls = [m["t"] - prev["t"] for prev, m in zip(marks[warmup - 1:], timed_marks)]
    return dict(marks=timed_marks, walls=walls, pipe=watcher.pipe, config=dict(module.config),
                queries=timed_marks[0]["queries"] - marks[warmup - 1]["queries"], first=marks[0]["t"] - start)


def unet_seconds(unet, x_shape, emb_shape, grad):
    """Median time of one UNet (or SD 3.5 transformer) evaluation on random inputs of these shapes, in
    its dtype and under its autocast as sampling.guided_eps calls it: forward only, or forward and
    backward into the trainable (LoRA) weights when the trainer's call carried gradient."""
    dev, dtype, b = unet.device, unet.dtype, x_shape[0]
    x, emb = torch.randn(x_shape, device=dev, dtype=dtype), torch.randn(emb_shape, device=dev, dtype=dtype)
    t = torch.full((b,), 500, device=dev)
    added = {}
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: a pooled text embedding and 6 time ids per latent
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = dict(added_cond_kwargs={"text_embeds": torch.randn(b, pooled, device=dev, dtype=dtype),
                                        "time_ids": torch.full((b, 6), 512.0, device=dev, dtype=dtype)})
    elif "pooled_projection_dim" in unet.config:  # SD 3.5: both CLIPs' pooled embeddings
        added = dict(pooled_projections=torch.randn(b, unet.config.pooled_projection_dim, device=dev, dtype=dtype))

    def call():
        with torch.set_grad_enabled(grad), mixed_precision.autocast(unet):
            y = unet(x, timestep=t, encoder_hidden_states=emb, **added).sample
        if grad:
            y.backward(torch.ones_like(y))
    call()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        call()
        _sync()
        times.append(time.perf_counter() - t0)
    unet.zero_grad(set_to_none=True)
    return statistics.median(times)


def per_epoch(r):
    """(wall seconds, {section: seconds}, seconds writing files) of an average timed epoch of a
    time_trainer result."""
    n = len(r["marks"])
    wall = sum(r["walls"]) / n
    seconds = {s: sum(m["times"].get(s, 0.0) for m in r["marks"]) / n for s in SECTIONS[:-1]}
    seconds["overhead"] = wall - sum(seconds.values())  # including the writing of files
    return wall, seconds, sum(m["times"].get("writing", 0.0) for m in r["marks"]) / n


def bench_trainer(name, extra):
    """The breakdown of one epoch of trainer `name` (seconds and fractions), its UNet calls, the
    overhead ratio and the timed epochs' log records (DDPO's and PRDP's ratio_dev among them)."""
    r = time_trainer(name, extra)
    n = len(r["marks"])
    wall, seconds, writing = per_epoch(r)
    calls = sum((m["calls"] for m in r["marks"]), Counter())  # epochs may differ (AlignProp's random K)
    unet = sampling.denoiser(r["pipe"])
    kinds = [dict(x=list(x), emb=list(e), grad=g, count=c / n, seconds_each=unet_seconds(unet, x, e, g))
             for (x, e, g), c in sorted(calls.items(), key=lambda kv: kv[0][2])]
    unet_total = sum(k["count"] * k["seconds_each"] for k in kinds)
    gpu = [m["gpu_mb"] for m in r["marks"] if m["gpu_mb"] is not None]
    return dict(trainer=name, args=" ".join(extra), wall=wall, logged=sum(m["logged"] for m in r["marks"]) / n,
                peak_gpu_mb=max(gpu) if gpu else None,
                queries=r["queries"], seconds=seconds, fractions={s: v / wall for s, v in seconds.items()},
                writing=writing, unet_calls=kinds, unet_seconds=unet_total, overhead_ratio=wall / unet_total,
                config=r["config"], first=r["first"], log=[m["log"] for m in r["marks"]])  # the epochs' log records


# ------------------------------------------------------------------------------------------------
# 7. The same epoch with the UNet compiled (--compile=on, plumbing/compiling.py), and what compiling costs

def bench_compiled(name, extra):
    """Trainer `name`'s epoch with its UNet compiled, run twice: with an empty compiler cache (the
    first run on a machine) and again, after Dynamo's in-memory caches are dropped, with the on-disk
    cache that the first run filled (what every later run pays: experiments/compare.py's runs after its first).
    Returns the second run's seconds per section and both runs' time to the end of the first epoch."""
    cache, firsts = tempfile.mkdtemp(prefix="bench-inductor-"), []
    try:
        with mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache):  # the variable as it was, after
            for _ in range(2):
                torch._dynamo.reset()
                r = time_trainer(name, extra, compiled=True)
                firsts.append(r["first"])
    finally:
        torch._dynamo.reset()
        shutil.rmtree(cache, ignore_errors=True)
    wall, seconds, _ = per_epoch(r)
    return dict(wall=wall, seconds=seconds, first_cold=firsts[0], first_warm=firsts[1])


# ------------------------------------------------------------------------------------------------
# 3. Sampling throughput, CFG batched or not

def two_call_eps(unet, x, t, cond, uncond, scale):
    """Classifier-free guidance without batching: the unconditional and conditional predictions
    from two UNet calls on B latents each (what sampling.guided_eps does in one call on 2B)."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    uncond = sampling.expand(uncond, x.shape[0])
    out_uncond = unet(x.to(unet.dtype), t, **sampling.unet_inputs(uncond, unet.dtype)).sample
    out_cond = unet(x.to(unet.dtype), t, **sampling.unet_inputs(cond, unet.dtype)).sample
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return out_uncond.to(x.dtype) + scale * (out_cond - out_uncond).to(x.dtype)


def throughput(pipe, batch, batched):
    """Images per second of sampling.rollout (DDIM with CFG, then VAE decode) at this batch size."""
    cond = sampling.encode_prompts(pipe, ["a red circle on a dark background"] * batch)
    uncond = sampling.unconditional(pipe)
    guided_eps = sampling.guided_eps if batched else two_call_eps
    with mock.patch.object(sampling, "guided_eps", guided_eps), torch.no_grad():  # the name rollout calls
        run = lambda: sampling.rollout(pipe, cond, uncond, guidance, num_steps=num_steps, eta=0.0,
                                       generator=torch.Generator().manual_seed(0))
        run()  # warm-up
        _sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        _sync()
        return batch * repeats / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Checks and the run

def check_trainer(name, extra):
    """The trainer's own checks (its main(check_only=True)) on the options bench passes it: a bad
    --ddpo_args or --alignprop_args fails at once, not after the other trainer has been timed."""
    for a in extra:
        key = a[2:].partition("=")[0].replace("-", "_")
        require(key not in NOT_IN_ARGS, f"--{name}_args must not set --{key}: experiments/bench.py sets it")
    try:
        configurator.fresh(TRAINER_MODULES[name], [*model_args(), *extra]).main(check_only=True)
    except SystemExit as e:
        raise SystemExit(f"error: in --{name}_args ({TRAINER_MODULES[name]}.py): {str(e).removeprefix('error: ')}")


def main():
    # checks first: bad input costs nothing
    names = [n.strip() for n in trainers.split(",") if n.strip()]
    if bad := [n for n in names if n not in TRAINER_MODULES]:
        raise SystemExit(f"error: --trainers takes {', '.join(TRAINER_MODULES)} (comma-separated), got {bad[0]!r}")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"error: --batch_sizes must be comma-separated integers, got {batch_sizes!r}")
    ks = [k.strip() for k in truncations.split(",") if k.strip()]
    if bad := [k for k in ks if k != "all" and not (k.isdigit() and int(k) >= 1)]:
        raise SystemExit(f"error: --truncations takes K values (integers >= 1 or 'all', comma-separated), got {bad[0]!r}")
    if warmup < 1 or epochs < 1 or repeats < 1 or any(b < 1 for b in sizes):
        raise SystemExit("error: --warmup, --epochs, --repeats and every batch size must be >= 1 "
                         "(the first timed epoch starts where a warm-up epoch ends)")
    at_least(1, num_steps=num_steps)
    at_least(0, guidance=guidance)
    try:
        pipelines.check_model(model, revision or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    require(not json_out or os.path.isdir(os.path.dirname(os.path.abspath(json_out))),
            f"--json_out={json_out}: its folder does not exist")
    given = {"ddpo": ddpo_args, "alignprop": alignprop_args, "prdp": prdp_args}
    extras = {n: shlex.split(given[n]) for n in TRAINER_MODULES}
    for n in names:
        check_trainer(n, extras[n])
    for k in ks:  # each K is its own train_alignprop.py run
        check_trainer("alignprop", [*extras["alignprop"], f"--truncation={k}"])
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes are running, and the "
              "timings will be slow and noisy (quote numbers measured on a quiet machine)", flush=True)
    results = []
    for n in names:
        print(f"timing {warmup} + {epochs} epochs of {TRAINER_MODULES[n]}.py ...", flush=True)
        results.append(bench_trainer(n, extras[n]))
        if compiled:
            print("timing it again with the UNet compiled (a cold, then a warm compiler cache) ...", flush=True)
            results[-1]["compiled"] = bench_compiled(n, extras[n])
    speeds = []
    if sizes:
        pipe = pipelines.load_pipeline(model, device="cuda" if torch.cuda.is_available() else "cpu",
                                       revision=revision or None, variant=variant or None)
        for b in sizes:
            print(f"sampling throughput, batch {b} ...", flush=True)
            speeds.append(dict(batch=b, batched=throughput(pipe, b, True), unbatched=throughput(pipe, b, False)))
    ktable = bench_parts.truncation_table(ks, [*model_args(), *shlex.split(alignprop_args)])
    sdmem = gpu_memory.sd_memory_table() if sd_memory else None
    sdxlmem = gpu_memory.sdxl_memory_table() if sdxl_memory else None
    sd3mem = gpu_memory.sd3_memory_table() if sd3_memory else None
    noise = bench_parts.ratio_noise_table(model, guidance, num_steps) if ratio_noise else []
    text = bench_parts.markdown(results, speeds, ktable, sdmem, sdxlmem, noise, sections=SECTIONS, model=model,
                                num_steps=num_steps, guidance=guidance, sd3mem=sd3mem)
    print("\n" + text)
    if json_out:
        data = dict(machine=bench_parts.machine(), model=model, trainers=results, throughput=speeds, truncation=ktable,
                    sd_memory=sdmem, sdxl_memory=sdxlmem, sd3_memory=sd3mem, ratio_noise=noise)
        with open(json_out, "w") as f:
            json.dump(data, f, indent=2)
    return results, speeds


if __name__ == "__main__":
    configurator.configure(globals())
    main()
