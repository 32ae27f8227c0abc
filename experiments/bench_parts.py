"""The parts of experiments/bench.py that time no trainer in its process, and its report.

4. AlignProp's truncation: each setting a train_alignprop.py child process, which reports its own
   peak memory as it exits (run_child).
6. DDPO's first-step ratio when the recorded log-probs and their recomputation round differently.
The markdown report of every table bench measures (the same tables bench writes as JSON).

The numbers are bench.py's sections (its docstring describes each measurement); bench.py passes its
options in (the model, its trainer options, the throughput's steps and guidance).
"""
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

import pipelines
import prompt_sets
import sampling
from experiments import gpu_memory

# ------------------------------------------------------------------------------------------------
# 4. AlignProp's truncation: memory and time per K, with and without gradient checkpointing

# A child Python that runs a script and then reports its peak resident memory. VmHWM is the
# high-water mark of the process's own address space, which exec starts afresh; the rusage
# ru_maxrss would also count the parent's memory at the fork (the pytest or bench process).
PEAK_WRAPPER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"bench-peak-kb {kb}", flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # on a GPU, its memory is the one that counts
        print(f"bench-peak-gpu-kb {torch.cuda.max_memory_allocated() // 1024}", flush=True)
"""


def run_child(script_argv, log_path):
    """Run `python <script> <args>` to completion, output to `log_path`; return (exit code, its
    peak memory in MB, or None if it could not report it): its GPU's if it used one, else resident."""
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *script_argv], stdout=log,
                              stderr=subprocess.STDOUT).returncode
    with open(log_path) as f:
        lines = f.read().splitlines()
    peaks = [l.split()[1] for l in lines if l.startswith("bench-peak-gpu-kb ")] or \
        [l.split()[1] for l in lines if l.startswith("bench-peak-kb ")]
    return code, int(peaks[-1]) / 1024 if peaks else None


def truncation_table(ks, args):
    """For each K and checkpointing off/on: a 4-epoch train_alignprop.py run of `args` (bench's model
    options and --alignprop_args) in its own process; seconds per update = the median of epochs 1-2
    (epoch 0 warms up, the last one evaluates)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_alignprop.py")
    rows = []
    for k in ks:
        for ckpt in (False, True):
            out = tempfile.mkdtemp(prefix="bench-k-")
            cmd = [script, *args, f"--truncation={k}",
                   f"--checkpointing={str(ckpt).lower()}", "--epochs=4", "--eval_every=1000000", f"--out={out}/run"]
            print(f"AlignProp K={k}, checkpointing {'on' if ckpt else 'off'} ...", flush=True)
            code, peak_mb = run_child(cmd, os.path.join(out, "output.txt"))
            if code != 0:
                with open(os.path.join(out, "output.txt")) as f:
                    tail = f.read()[-2000:]
                raise SystemExit(f"error: train_alignprop.py failed with K={k}, checkpointing={ckpt}:\n{tail}")
            with open(os.path.join(out, "run", "log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            with open(os.path.join(out, "run", "config.json")) as f:
                steps = json.load(f)["steps_per_epoch"]
            rows.append(dict(k=k, checkpointing=ckpt, peak_mb=peak_mb,
                             seconds_per_step=statistics.median(r["seconds"] for r in log[1:3]) / steps))
            shutil.rmtree(out, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------------
# 6. DDPO's first ratio when sampling and training round differently

def ratio_noise_table(model, guidance, num_steps, batch=16):
    """|ratio - 1| of every step of `batch` chains (eta 1, the model's prompts) between the log-probs
    recorded while sampling and their recomputation: bf16 at batch and batch/4 samples per UNet call,
    and fp32 against bf16 either way."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pipes = {p: pipelines.load_pipeline(model, device=dev, precision=p) for p in ("fp32", "bf16")}
    prompts = prompt_sets.load_prompts("shapes" if model == "shapes" else "animals")
    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    cond, uncond = sampling.encode_prompts(pipes["fp32"], prompts), sampling.encode_prompts(pipes["fp32"], [""])
    rows = []
    for (a, ka), (b, kb) in ((("bf16", batch), ("bf16", batch // 4)), (("fp32", batch), ("bf16", batch)),
                             (("bf16", batch), ("fp32", batch))):
        print(f"ratio noise: recorded in {a}, recomputed in {b} ...", flush=True)
        with torch.no_grad():
            traj = sampling.rollout(pipes[a], cond, uncond, guidance, num_steps=num_steps, eta=1.0, decode=False,
                                    generator=torch.Generator().manual_seed(0), unet_batch=ka)
        data = dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond, uncond=traj.uncond,
                    scale=traj.guidance.expand(batch, -1))
        with torch.no_grad():  # the recorded steps, replayed as PRDP's training replays them
            lp = sampling.replay(pipes[b].unet, pipes[b].scheduler, data, traj.timesteps, 1.0, kb)
        gap = (lp - traj.log_probs).exp().sub(1).abs()
        rows.append(dict(recorded=f"{a}, {ka} per UNet call", recomputed=f"{b}, {kb} per UNet call",
                         max=gap.max().item(), median=gap.median().item()))
    return rows


# ------------------------------------------------------------------------------------------------
# The report

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} with {torch.get_num_threads()} threads"


def describe(b):
    c = b["config"]
    if b["trainer"] == "ddpo":
        return (f"DDPO: {c['num_batches']} x {c['sample_batch_size']} samples, {c['num_steps']} steps, "
                f"train batch {c['train_batch_size']}, timestep fraction {c['timestep_fraction']:g}")
    if b["trainer"] == "prdp":
        return (f"PRDP: {c['prompts_per_epoch']} prompts x {c['images_per_prompt']} images, {c['num_steps']} steps, "
                f"{c['updates_per_epoch']} updates per epoch, train batch {c['train_batch_size']}")
    return (f"AlignProp: {c['steps_per_epoch']} steps x {c['grad_accum']} x {c['batch_size']} samples, "
            f"{c['num_steps']} steps, truncation K={c['truncation']}")


def markdown(results, speeds, ktable=(), sdmem=None, sdxlmem=None, noise=(), *, sections, model, num_steps, guidance,
             sd3mem=None):
    """bench's tables as markdown: the trainers' epochs (`results`, their `sections` in this order),
    sampling throughput, AlignProp's truncation, the GPU memory estimates and the ratio noise; the
    keywords are bench's options the headings name."""
    cols = results
    lines = [f"Machine: {machine()}; model `{model}`.", ""]
    for b in cols:
        lines.append(f"- {describe(b)}; {b['queries']} reward queries per epoch" + (f"; options `{b['args']}`" if b["args"] else ""))
    if cols:
        comp = all("compiled" in b for b in cols)  # two more columns per trainer: compiled seconds, speed-up
        pad = " | |" if comp else ""  # those columns in rows that only the eager run has

        def row(label, cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        head = (lambda b: f"{b['trainer']} s | {b['trainer']} share" + (f" | {b['trainer']} compiled s | speed-up" if comp else ""))
        lines += ["", "| one epoch | " + " | ".join(head(b) for b in cols) + " |",
                  "|---|" + ("---:|---:|" * (2 if comp else 1)) * len(cols)]
        speed = lambda a, c: f"{a / c:.2f}x" if c > 1e-4 else ""

        def seconds(b, s):
            cell = f"{b['seconds'][s]:.3f} | {b['fractions'][s]:.1%}"
            return cell + (f" | {b['compiled']['seconds'][s]:.3f} | {speed(b['seconds'][s], b['compiled']['seconds'][s])}"
                           if comp else "")
        for s in sections:
            row(s, [seconds(b, s) for b in cols])
        row("(overhead: of which writing checkpoint, log, plot)", [f"({b['writing']:.3f}) | ({b['writing'] / b['wall']:.1%})" + pad for b in cols])
        row("**wall time**", [f"**{b['wall']:.3f}** | 100%" + (f" | **{b['compiled']['wall']:.3f}** | "
                                                                 f"**{speed(b['wall'], b['compiled']['wall'])}**" if comp else "") for b in cols])
        if comp:
            row("start to the end of the first epoch (loading, evaluation before training, compiling: cold / warm compiler cache)",
                [f"{b['first']:.1f} | | {b['compiled']['first_cold']:.1f} / {b['compiled']['first_warm']:.1f} |" for b in cols])
        calls = lambda b: " + ".join(f"{k['count']:g} x {'fwd+bwd' if k['grad'] else 'fwd'} [{k['x'][0]}]" for k in b["unet_calls"])
        row("UNet calls [batch]", [f"{calls(b)} | " + pad for b in cols])
        row("pure UNet time (eager)", [f"{b['unet_seconds']:.3f} | " + pad for b in cols])
        row("**overhead ratio** (wall / pure UNet, eager)", [f"**{b['overhead_ratio']:.2f}** | " + pad for b in cols])
        if any(b["peak_gpu_mb"] is not None for b in cols):
            row("peak GPU memory (MB, max_memory_allocated)", [f"{b['peak_gpu_mb'] or 0:.0f} | " + pad for b in cols])
    if speeds:
        lines += ["", f"Sampling throughput, images/s ({num_steps} DDIM steps, guidance {guidance:g}, VAE decode included):", "",
                  "| batch | CFG batched (one UNet call on 2B) | unbatched (two calls on B) | speed-up |", "|---:|---:|---:|---:|"]
        for s in speeds:
            lines.append(f"| {s['batch']} | {s['batched']:.2f} | {s['unbatched']:.2f} | {s['batched'] / s['unbatched']:.2f}x |")
    if ktable:
        lines += ["", "AlignProp truncation (each row its own process; peak memory: on a GPU torch's max_memory_allocated, "
                  "on a CPU the resident memory, which includes the process's Python, torch and models):", "",
                  "| K steps with gradient | checkpointing | peak memory (MB) | seconds per update |", "|---|---|---:|---:|"]
        for r in ktable:
            lines.append(f"| {r['k']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_mb']:.0f} | {r['seconds_per_step']:.2f} |")
    if sdmem:
        lines += [""] + gpu_memory.markdown(sdmem)
    if sdxlmem:
        lines += [""] + gpu_memory.markdown(sdxlmem, "SDXL")
    if sd3mem:
        lines += [""] + gpu_memory.markdown(sd3mem, "SD 3.5")
    if noise:
        lines += ["", f"DDPO's first-step |ratio - 1| when sampling and training round differently ({num_steps} steps, "
                  "eta 1; every step of every chain):", "",
                  "| log-probs recorded in | recomputed in | max | median |", "|---|---|---:|---:|"]
        for r in noise:
            lines.append(f"| {r['recorded']} | {r['recomputed']} | {r['max']:.1e} | {r['median']:.1e} |")
    return "\n".join(lines) + "\n"
