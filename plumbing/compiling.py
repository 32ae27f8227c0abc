"""`--compile`: the UNet through torch.compile (PyTorch 2's TorchDynamo + Inductor), and when it pays.

Compiling traces the UNet's Python into graphs and generates fused kernels for them: fewer passes over
memory for the many small elementwise ops (norms, activations, the LoRA adds) between the convolutions
and matmuls. It changes the speed, not the maths: the same parameters in the same module (the LoRA
layers, state_dict keys and files are untouched; `nn.Module.compile` compiles in place), with results
equal up to floating-point reassociation (tests/test_compiling.py).

It costs a compilation first: once for sampling (no gradient), once for training (forward and
backward), once more for every other input shape or mode, such as the evaluation's micro-batch or
PRDP's reference model (lora.disabled switches the low-rank path off: another graph). Inductor keeps
what it compiled in an on-disk cache that every process of the user shares ($TORCHINDUCTOR_CACHE_DIR,
by default torchinductor_<user> in the temporary folder), so the next run with the same shapes
compiles almost nothing: experiments/compare.py's runs after its first, a resumed run, the next seed.
`python -m experiments.bench` measures both sides of the trade on the machine at hand: the seconds per epoch
eager and compiled, and the time to the end of the first epoch with a cold and a warm cache.

    --compile=auto   on where it pays and changes nothing that matters:
                     - with CUDA (long runs of a large UNet: the compile is minutes against hours);
                       on the CPU only in experiments/compare.py, whose runs share the cache, so only the first
                       pays (one shapes-world run barely pays for a cold compile: docs/performance.md, "Where the
                       time goes"), and only with a C++ compiler on the PATH, which Inductor needs;
                     - but never for DDPO and PRDP in bf16 or fp16 (CUDA's default precision). They
                       record each step's log-prob while sampling (no gradient) and recompute it in
                       training (with gradient), and the likelihood ratio of the two must start at 1
                       to well within the clip range (1e-4 on SD 1.5). Eager, both come from the same
                       kernels (ratio_dev 0); compiled, the inference graph and the training graph
                       are different generated code: in fp32 they differ by rounding (ratio_dev
                       2.4e-7 on the shapes world), in bf16 by 5e-3 to 8e-3 (CPUs), past the clip.
    --compile=on     always (a bare --compile means on); DDPO and PRDP in bf16/fp16 warn about the above
    --compile=off    never
"""
import os
import shutil

import torch

from plumbing.configurator import require, switch


def check(compile):
    """--compile, checked before any model work (spelled as a boolean may be: nanoGPT's --compile=True works)."""
    require(switch(compile) is not None, f"--compile must be auto, on or off, got {compile!r}")


def can_compile(device):
    """Can Inductor generate code here? CUDA: Triton comes with torch's CUDA builds; the CPU: it
    compiles C++, so it needs a C++ compiler ($CXX, else g++, c++ or clang++ on the PATH)."""
    if torch.device(device).type == "cuda":
        return True
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def wanted(compile, device, dtype=torch.float32, replays=False, many_runs=False):
    """Does --compile ask for compiling? `dtype`: the UNet's; `replays`: the trainer recomputes the
    log-probs it recorded while sampling (DDPO, PRDP); `many_runs`: experiments/compare.py's runs. (auto: see the
    docstring at the top)"""
    choice = switch(compile)
    if choice != "auto":
        return choice
    if replays and dtype != torch.float32:
        return False
    return can_compile(device) and (torch.device(device).type == "cuda" or many_runs)


def unet(model, compile, device, replays=False, backend="inductor"):
    """Compile `model` (the UNet, with its LoRA layers already injected) in place if --compile asks for
    it; return whether it did. Compilation itself happens lazily, at the first call. (`backend`: the
    tests use "aot_eager", Dynamo's graph capture and AOTAutograd without Inductor's code generation,
    which costs them minutes.)"""
    if not wanted(compile, device, model.dtype, replays):
        return False
    if replays and model.dtype != torch.float32:
        print(f"warning: --compile=on with a {str(model.dtype).removeprefix('torch.')} UNet: the log-probs "
              "recorded while sampling and recomputed in training come from differently compiled code, and "
              "the first likelihood ratio may be off 1 by more than the clip range (ratio_dev in the log); "
              "--compile=off or --precision=fp32 keeps them equal")
    # Training replays steps with micro-batches of other sizes than sampling's: Dynamo generalises
    # over the batch dimension after the second size instead of compiling every size anew.
    model.compile(dynamic=None, backend=backend)
    return True
