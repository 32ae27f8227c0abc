"""The GPU check: everything this project wants to know from a GPU it is lent, in one command, in at
most 8 minutes on one H100, with nothing downloaded (the machine may have no internet).

    python -m experiments.gpu_check                  # on a machine with CUDA: writes gpu_check.json
    python -m experiments.gpu_check --tiny           # the same steps on the CPU with tiny models, seconds

1. `pytest tests/test_cuda.py` in a child process: its passed, failed and skipped counts and the
   names of the failures.
2. A Stable Diffusion 1.5-shaped pipeline built from SD 1.5's configs (experiments/gpu_memory.py
   writes them down) with random weights, the offline CLIP tokenizer and SD's DDIM scheduler, saved
   to a temporary folder that the trainers load with --model=<folder>. Random weights draw noise,
   not pictures, but every UNet call costs what SD 1.5's costs, which is what is measured here.
3. Each trainer on it through experiments/bench.py's timed epoch (the trainer's own main(), watched
   by bench's observer, plumbing/lifecycle.py): one warm-up and one timed epoch, eager, in the GPU's
   default precision (bf16), at the SD 1.5 recipes' micro-batch shapes with few DDIM steps and a
   reward that needs no weights. From each: the epoch's parts, the overhead ratio (epoch time / the
   pure UNet time of the same calls), the epoch's peak GPU memory against gpu_memory's estimate for
   the same batches, and DDPO's and PRDP's ratio_dev (how far the first likelihood ratio is from 1:
   do sampling and training round alike on this GPU's bf16 kernels?).
4. The same for an SD 3.5 Medium-shaped pipeline at 1024 px: its MM-DiT transformer (the "UNet"
   here), 16-channel VAE, both CLIP text encoders with their projections, T5-XXL's encoder (4.7
   billion weights, made on the GPU like the rest; --sd3_t5=false leaves it out, 9.5 GB less to save
   and load) with an offline T5 tokenizer of T5's 32,100 entries, and its flow-matching Euler scheduler
   (shift 3); each trainer at the SD 3.5 recipes' micro-batches (docs/sd3.md), the flow SDE at noise
   level 0.7, DDPO with its KL term at LoRA rank 32.
5. The same for an SDXL-shaped pipeline at 1024 px, as far as the time left allows. SD 3.5 goes
   before SDXL because the parts' limits add up to far more than the budget, so whatever comes last
   is the likeliest to be skipped, and SD 3.5's runs take paths that no GPU has run and SD 1.5's do
   not (the transformer, the flow step, T5, the KL term), where SDXL's are SD 1.5's code with a
   larger UNet. `--models=sdxl --cuda_tests=false` runs SDXL alone.

Each part runs under a time limit (PART_SECONDS) and the whole under --budget: a part that runs out
of time is stopped and recorded as such, one that would start with too little time left is skipped
and says so. The JSON file is rewritten after every part, so a check stopped from outside still
leaves what it measured. --tiny runs every step on the CPU with tiny models instead (that checks the
script itself; tests/test_gpu_check.py runs it).
"""
import contextlib
import datetime
import gc
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub, and a lookup without internet can hang

import torch

import lora
from experiments import bench, bench_parts, gpu_memory
from plumbing import configurator
from plumbing.configurator import at_least, require

# ------------------------------------------------------------------------------------------------
# defaults (override with --key=value; `python -m experiments.gpu_check --help` lists them)
tiny = False                  # tiny models on the CPU (seconds): a check of this script, not of a GPU
json_out = "out/gpu_check.json"  # where everything measured goes (rewritten after every part; its folder is made)
budget = 450                  # seconds for the whole check (8 minutes, less the interpreter's start)
models = "sd15,sd3,sdxl"      # which pipelines' shapes to run the trainers on, in this order (of sd15, sd3, sdxl)
trainers = "ddpo,alignprop,prdp"  # which trainers to run on each
cuda_tests = True             # 1. run tests/test_cuda.py first
repeats = 3                   # timed repetitions of each pure-UNet call shape (bench's --repeats)
sd3_t5 = True                 # build SD 3.5's T5-XXL encoder (false: 9.5 GB less to write and load; zeros for its tokens)
# ------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_SECONDS = {"cuda_tests": 150, "build sd15": 90, "sd15": 90, "build sdxl": 120, "sdxl": 120,
                "build sd3": 150, "sd3": 120}  # SD 3.5's folder: 16 GB in bf16, T5's 9.5 of them
MIN_START = 20  # seconds: a part that would start with less is skipped, not begun and cut off

# The pipelines' shapes: SD 1.5's, SDXL's and SD 3.5 Medium's own configs (in gpu_memory), or tiny ones
# of the same classes (tests/conftest.py's tiny pipelines) for --tiny. One text config per CLIP text
# encoder; SD 3.5's "unet" is its transformer.
TOKENS = dict(bos_token_id=49406, eos_token_id=49407)  # the CLIP tokenizer's: SDXL pools at the end token
SHAPES = {
    "sd15": dict(unet=gpu_memory.SD15_UNET, vae=gpu_memory.SD15_VAE, text=[gpu_memory.SD15_TEXT_ENCODER]),
    "sdxl": dict(unet=gpu_memory.SDXL_UNET, vae=gpu_memory.SD15_VAE,  # SDXL's VAE has SD 1.5's architecture
                 text=[gpu_memory.SD15_TEXT_ENCODER, gpu_memory.SDXL_TEXT_ENCODER_2]),
    "sd3": dict(unet=gpu_memory.SD3_TRANSFORMER, vae=gpu_memory.SD3_VAE, t5=gpu_memory.SD3_T5,  # CLIPs as SDXL's
                text=[gpu_memory.SD15_TEXT_ENCODER, gpu_memory.SDXL_TEXT_ENCODER_2]),
}
TINY_TEXT = dict(vocab_size=49408, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
TINY_SHAPES = {
    "sd15": dict(unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                           attention_head_dim=4, norm_num_groups=4),
                 vae=TINY_VAE, text=[dict(TINY_TEXT, hidden_size=16, projection_dim=16)]),
    "sdxl": dict(unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                           cross_attention_dim=16 + 24, attention_head_dim=(2, 4), norm_num_groups=4,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=8 + 6 * 4),  # pooled + 6 time ids x 4
                 vae=TINY_VAE, text=[dict(TINY_TEXT, hidden_size=16, projection_dim=16, hidden_act="quick_gelu"),
                                     dict(TINY_TEXT, hidden_size=24, projection_dim=8, hidden_act="gelu")]),
    "sd3": dict(unet=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                          caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8),
                vae=dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False),
                t5=dict(d_model=48, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=gpu_memory.SD3_T5["vocab_size"]),
                text=[dict(TINY_TEXT, hidden_size=16, projection_dim=8, hidden_act="quick_gelu"),
                      dict(TINY_TEXT, hidden_size=24, projection_dim=8, hidden_act="gelu")]),
}
# SD 1.5's scheduler_config.json (SDXL's has the same betas and spacing); load_pipeline makes it DDIM
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD 3.5's (FlowMatchEulerDiscreteScheduler; kept)
T5_PIECES = 32000  # T5's SentencePiece vocabulary; with its 100 sentinel ids, its tokenizer's 32,100 entries

# What each trainer runs. Every run explores (DiffExp's two changes are on the sampling path being
# timed) and evaluates one image before training (the lifecycle always evaluates first). Rewards
# without weights: JPEG size, and for AlignProp the shapes world's differentiable appeal score.
COMMON = "--prompts=animals --explore --eval_prompts=1 --eval_seeds=1"
RUNS = {
    # SD 1.5 at 512 px, the recipes' micro-batches (docs/gpu.md: 8 sampled per call, 4 trained per
    # micro-batch for DDPO and PRDP, 8 per AlignProp micro-batch with checkpointing), 10 DDIM steps
    ("sd15", "ddpo"): "--reward=jpeg_compressibility --num_steps=10 --sample_batch_size=8 --samples_per_prompt=1 "
                      "--num_batches=1 --train_batch_size=4 --grad_accum=2 --timestep_fraction=1 --clip_range=1e-4",
    ("sd15", "alignprop"): "--reward=shapes_appeal --num_steps=10 --truncation=rand --k_min=1 --k_max=10 "
                           "--batch_size=8 --grad_accum=1 --steps_per_epoch=1",
    ("sd15", "prdp"): "--reward=jpeg_compressibility --num_steps=10 --prompts_per_epoch=1 --images_per_prompt=8 "
                      "--sample_batch_size=8 --train_batch_size=4 --updates_per_epoch=2",
    # SDXL at 1024 px, its recipes' micro-batches (2 for DDPO and PRDP, 1 for AlignProp), 6 steps
    ("sdxl", "ddpo"): "--reward=jpeg_compressibility --num_steps=6 --sample_batch_size=4 --samples_per_prompt=1 "
                      "--num_batches=1 --train_batch_size=2 --grad_accum=2 --timestep_fraction=1 --clip_range=1e-4",
    ("sdxl", "alignprop"): "--reward=shapes_appeal --num_steps=6 --truncation=rand --k_min=1 --k_max=6 "
                           "--batch_size=1 --grad_accum=2 --steps_per_epoch=1",
    ("sdxl", "prdp"): "--reward=jpeg_compressibility --num_steps=6 --prompts_per_epoch=1 --images_per_prompt=4 "
                      "--sample_batch_size=4 --train_batch_size=2 --updates_per_epoch=2",
    # SD 3.5 Medium at 1024 px, its recipes' micro-batches (docs/sd3.md: DDPO 2 at LoRA rank 32 with the
    # KL term, AlignProp 1, PRDP 2), guidance 4.5, the flow SDE at noise level 0.7, 6 steps
    ("sd3", "ddpo"): "--reward=jpeg_compressibility --num_steps=6 --eta=0.7 --guidance=4.5 --sample_batch_size=4 "
                     "--samples_per_prompt=1 --num_batches=1 --train_batch_size=2 --grad_accum=2 --timestep_fraction=1 "
                     "--clip_range=1e-4 --kl_beta=0.01 --lora_rank=32",
    ("sd3", "alignprop"): "--reward=shapes_appeal --num_steps=6 --guidance=4.5 --truncation=rand --k_min=1 --k_max=6 "
                          "--batch_size=1 --grad_accum=2 --steps_per_epoch=1",
    ("sd3", "prdp"): "--reward=jpeg_compressibility --num_steps=6 --eta=0.7 --guidance=4.5 --prompts_per_epoch=1 "
                     "--images_per_prompt=4 --sample_batch_size=4 --train_batch_size=2 --updates_per_epoch=2",
}
TINY_RUNS = {  # tests/conftest.py's smallest runs
    "ddpo": "--reward=jpeg_compressibility --num_steps=2 --sample_batch_size=2 --samples_per_prompt=2 "
            "--num_batches=1 --train_batch_size=2 --stat_min_count=2",
    "alignprop": "--reward=shapes_appeal --num_steps=2 --batch_size=2 --steps_per_epoch=1",
    "prdp": "--reward=jpeg_compressibility --num_steps=2 --prompts_per_epoch=1 --images_per_prompt=2 "
            "--sample_batch_size=2 --train_batch_size=2 --updates_per_epoch=2",
}
TINY_SD3 = {"ddpo": "--eta=0.7 --kl_beta=0.01", "prdp": "--eta=0.7"}  # SD 3.5's runs' flow SDE and KL term


def run_args(model, trainer):
    """The trainer options of one run (bench adds --model, --out, the epochs and --compile=off)."""
    run = f"{TINY_RUNS[trainer]} {TINY_SD3.get(trainer, '') if model == 'sd3' else ''}" if tiny else RUNS[model, trainer]
    return shlex.split(f"{run} {COMMON}")


# ------------------------------------------------------------------------------------------------
# Time limits

class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise OutOfTime in this (the main) thread after `seconds`. On a GPU the Python thread only
    launches kernels and waits at synchronisations, so it gets the signal within a kernel's time."""
    def stop(signum, frame):
        raise OutOfTime(f"stopped at its limit of {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_memory():
    """What a finished (or stopped) part held, released before the next part is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part(name, limit, fn, deadline):
    """fn() within min(limit, the time left before `deadline`): its result dict with status "ok",
    or a dict saying why there is none (skipped, out of time, failed: one line), with its seconds."""
    left = deadline - time.monotonic()
    if left < MIN_START:
        return dict(status=f"skipped: {max(left, 0):.0f} s of the budget left")
    print(f"gpu_check: {name} (at most {min(limit, left):.0f} s) ...", flush=True)
    t0 = time.monotonic()
    try:
        with time_limit(min(limit, left)):
            result = dict(status="ok", **fn())
    except OutOfTime as e:
        result = dict(status=f"out of time: {e}")
    except (Exception, SystemExit) as e:  # a trainer's one-line errors are SystemExit
        first = (str(e).strip().splitlines() or [""])[0]
        result = dict(status=f"failed: {type(e).__name__}: {first}")
    free_memory()
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# 1. tests/test_cuda.py

def run_cuda_tests(deadline, folder):
    """pytest tests/test_cuda.py in a child process, stopped 5 s before the part's end; its counts
    from pytest's JUnit XML report, the failures' names and the output's last lines."""
    xml = os.path.join(folder, "test_cuda.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", f"--junitxml={xml}"]
    limit = min(PART_SECONDS["cuda_tests"], deadline - time.monotonic()) - 5
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise OutOfTime(f"stopped after {limit:.0f} s; output: {out[-300:]!r}")
    suite = ET.parse(xml).getroot().find("testsuite")
    n = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0] if bad.get('message') else ''}"
              for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                errors=n["errors"], skipped=n["skipped"], failures=failed, returncode=r.returncode,
                output_tail=(r.stdout + r.stderr)[-1500:])


# ------------------------------------------------------------------------------------------------
# 2., 4. and 5. A pipeline of SD 1.5's, SD 3.5's or SDXL's shapes with random weights, saved as a folder

def t5_tokenizer():
    """A T5 tokenizer of T5's size, built offline (T5's own is SentencePiece's, a download): a
    unigram vocabulary of T5_PIECES pieces (the special three, the letters, a few common words, then
    fillers that no prompt meets) and T5's 100 sentinel ids. What it costs the pipeline is T5's
    256 tokens a prompt, whatever the pieces; the ids stay below the encoder's 32,128 embeddings."""
    from transformers import T5Tokenizer
    words = "a an the of on in with and riding playing eating cat dog horse bird fish red blue circle square".split()
    pieces = ["▁"] + [f"▁{w}" for w in words] + list("abcdefghijklmnopqrstuvwxyz")
    pieces += [f"▁x{i}" for i in range(T5_PIECES - 3 - len(pieces))]
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i)) for i, p in enumerate(pieces)],
                       extra_ids=100)


def build_pipeline(model, folder, device, dtype):
    """Build `model`'s pipeline ("sd15", "sdxl" or "sd3"; tiny ones with --tiny) with random weights on
    `device`, save it to `folder` in `dtype` (what the trainers will load it as), and return its
    sizes: the frozen weights and buffers (SD 3.5's transformer keeps its 226 million-entry position
    table in one) and the LoRA's weights per unit of rank (lora.inject's layers)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from shapes.models import clip_tokenizer, save_pipeline

    s = (TINY_SHAPES if tiny else SHAPES)[model]
    torch.manual_seed(0)
    t5 = None
    with torch.device(device):  # initialised where they will run: seconds for SDXL's 3.5 billion weights
        unet = (SD3Transformer2DModel if model == "sd3" else UNet2DConditionModel)(**s["unet"])
        vae = AutoencoderKL(**s["vae"])
        text = [(CLIPTextModelWithProjection if model == "sd3" else CLIPTextModel)(CLIPTextConfig(**s["text"][0], **TOKENS))]
        if model != "sd15":  # the second encoder's projection is the pooled embedding SDXL's UNet takes (SD 3.5's: both)
            text.append(CLIPTextModelWithProjection(CLIPTextConfig(**s["text"][1], **TOKENS)))
        if model == "sd3" and sd3_t5:  # T5 v1.1 XXL's encoder, as SD 3.5 loads it; no dropout, as loaded
            t5 = T5EncoderModel(T5Config(**s["t5"], is_encoder_decoder=False)).eval()
    tokenizers = [clip_tokenizer(c["max_position_embeddings"]) for c in s["text"]]
    if model != "sd15":
        tokenizers[1].pad_token = "!"  # as SDXL's and SD 3.5's tokenizer_2 pad
    if model == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=unet, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                        vae=vae, text_encoder=text[0], tokenizer=tokenizers[0], text_encoder_2=text[1],
                                        tokenizer_2=tokenizers[1], text_encoder_3=t5,
                                        tokenizer_3=t5_tokenizer() if t5 is not None else None)
        pipe.to(dtype).save_pretrained(folder)  # no CLIPTextModel (save_pipeline's 4.x form); T5's tokenizer is no BPE
    else:
        scheduler = DDIMScheduler(**SCHEDULER)
        if model == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text[0], text_encoder_2=text[1], tokenizer=tokenizers[0],
                                             tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
                                             force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text[0], tokenizer=tokenizers[0],
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        save_pipeline(pipe.to(dtype), folder)
    count = lambda *modules: sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers()))
    params = dict(unet=count(unet), vae=count(vae), text_encoders=count(*text), t5=count(t5) if t5 is not None else 0)
    lora_per_rank = sum(p.numel() for p in lora.inject(unet, rank=1))  # A and B grow linearly with the rank
    return dict(params=params, frozen=sum(params.values()), lora_per_rank=lora_per_rank)


# ------------------------------------------------------------------------------------------------
# 3. One trainer's timed epoch, its peak memory against the estimate, its ratio_dev

def estimate(model, trainer, c, counts):
    """gpu_memory's estimate of the run's peak (GB): the weights as --precision=bf16 holds them (this
    pipeline's counts; the rewards here have no model) + the larger of a training micro-batch's and a
    sampling call's activations, per image as gpu_memory.MEASURED_GB holds them for SD 1.5, SDXL and
    SD 3.5, with DDPO's KL call when --kl_beta is on (none for the tiny shapes: the estimate is then
    the weights alone)."""
    unet = {"sd15": "unet", "sdxl": "xl_unet", "sd3": "sd3"}[model]
    act = None if tiny else gpu_memory.MEASURED_GB[model]
    train_images, sample_images = ((c["batch_size"], c["batch_size"]) if trainer == "alignprop"
                                   else (c["train_batch_size"], c["sample_batch_size"]))
    weights = gpu_memory.weights_gb(counts["frozen"], counts["lora_per_rank"] * c["lora_rank"])
    kind = "AlignProp" if trainer == "alignprop" else "DDPO"  # PRDP trains with DDPO's UNet calls
    kl = c.get("kl_beta", 0) > 0
    train = train_images * gpu_memory.training_gb(act, unet, kind, kl=kl) if act else 0.0
    sample = sample_images * gpu_memory.sampling_gb(act, unet) if act else 0.0
    return dict(weights_gb=weights, training_gb=train, sampling_gb=sample, estimate_gb=weights + max(train, sample),
                train_images=train_images, sample_images=sample_images)


def time_run(model, trainer, folder, counts):
    """bench's timed epoch of `trainer` on the pipeline in `folder`, with the memory comparison and
    the largest ratio_dev its timed epochs logged (DDPO and PRDP; AlignProp logs none)."""
    configurator.configure(vars(bench), [f"--model={folder}", "--warmup=1", "--epochs=1", f"--repeats={repeats}"])
    args = run_args(model, trainer)
    bench.check_trainer(trainer, args)
    b = bench.bench_trainer(trainer, args)
    mem = estimate(model, trainer, b["config"], counts)
    peak = b["peak_gpu_mb"] / 1024 if b["peak_gpu_mb"] is not None else None
    mem.update(peak_gb=peak, peak_over_estimate=peak / mem["estimate_gb"] if peak is not None else None)
    devs = [r["ratio_dev"] for r in b["log"] if "ratio_dev" in r]
    return dict(args=" ".join(args), epoch_seconds=b["wall"], unet_seconds=b["unet_seconds"],
                overhead_ratio=b["overhead_ratio"], sections=b["seconds"], unet_calls=b["unet_calls"],
                reward_queries=b["queries"], first_epoch_end_seconds=b["first"], memory=mem,
                ratio_dev=max(devs) if devs else None, log=b["log"])


# ------------------------------------------------------------------------------------------------
# The check

def commit():
    """The repository's commit, if git and the .git folder came along to this machine."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


def write(report):
    """The report as JSON, written then renamed: a reader never sees half a file."""
    with open(json_out + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(json_out + ".tmp", json_out)


def summary(report):
    """One line per run: what the performance page quotes."""
    lines = ["| model | trainer | status | epoch s | pure UNet s | overhead ratio | peak GB | estimate GB | ratio_dev |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    num = lambda v, f: format(v, f) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
    for r in report["runs"]:
        m = r.get("memory", {})
        lines.append(f"| {r['model']} | {r['trainer']} | {r['status']} | {num(r.get('epoch_seconds'), '.2f')} | "
                     f"{num(r.get('unet_seconds'), '.2f')} | {num(r.get('overhead_ratio'), '.2f')} | "
                     f"{num(m.get('peak_gb'), '.1f')} | {num(m.get('estimate_gb'), '.1f')} | {num(r.get('ratio_dev'), '.1e')} |")
    c = report["cuda_tests"]
    return f"tests/test_cuda.py: {c['status']}" + (f", {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                                                   f"{c['skipped']} skipped" if "passed" in c else "") + "\n" + "\n".join(lines)


def main():
    # checks first: bad input costs nothing
    names = [m.strip() for m in models.split(",") if m.strip()]
    require(all(m in SHAPES for m in names), f"--models takes {', '.join(SHAPES)} (comma-separated), got {models!r}")
    runs = [t.strip() for t in trainers.split(",") if t.strip()]
    require(all(t in bench.TRAINER_MODULES for t in runs),
            f"--trainers takes {', '.join(bench.TRAINER_MODULES)} (comma-separated), got {trainers!r}")
    at_least(MIN_START, budget=budget)
    at_least(1, repeats=repeats)
    require(tiny or torch.cuda.is_available(), "no CUDA GPU here: the check is for a machine with one "
                                               "(--tiny runs its steps on the CPU with tiny models)")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --json_out={json_out}: cannot make its folder ({e.strerror})")
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16  # the trainers' --precision=auto on each
    deadline = time.monotonic() + budget
    t0 = time.monotonic()
    report = dict(check="python -m experiments.gpu_check" + (" --tiny" if tiny else ""), tiny=tiny,
                  machine=bench_parts.machine(), cuda=torch.version.cuda, commit=commit(), budget_s=budget, sd3_t5=sd3_t5,
                  started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  seconds=None, cuda_tests=dict(status="not run (--cuda_tests=false)"), pipelines={}, runs=[])
    work = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        if cuda_tests:
            report["cuda_tests"] = part("tests/test_cuda.py", PART_SECONDS["cuda_tests"],
                                        lambda: run_cuda_tests(deadline, work), deadline)
            write(report)
        for model in names:
            folder = os.path.join(work, model)
            built = report["pipelines"][model] = part(f"build {model}", PART_SECONDS[f"build {model}"],
                                                      lambda: build_pipeline(model, folder, device, dtype), deadline)
            write(report)
            for trainer in runs:
                if built["status"] != "ok":
                    result = dict(status=f"skipped: the {model} pipeline was not built")
                else:
                    result = part(f"{trainer} on {model}", PART_SECONDS[model],
                                  lambda: time_run(model, trainer, folder, built), deadline)
                report["runs"].append(dict(model=model, trainer=trainer, **result))
                write(report)
            shutil.rmtree(folder, ignore_errors=True)  # SD 3.5's (16 GB) and SDXL's folders need the disk space
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    write(report)
    print("\n" + summary(report) + f"\n\nwrote {json_out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    configurator.configure(globals())
    main()
