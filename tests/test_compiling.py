"""--compile (plumbing/compiling.py): the compiled UNet computes what the eager one does, LoRA and all."""
import copy

import pytest
import torch

import lora
import sampling
from plumbing import compiling, configurator
from conftest import tiny_pipeline


def test_choices():
    assert compiling.wanted("on", "cpu") and compiling.wanted("on", "cuda")
    assert not compiling.wanted("off", "cuda") and not compiling.wanted("off", "cpu")
    assert compiling.wanted("auto", "cuda:1") and not compiling.wanted("auto", "cpu")
    # DDPO and PRDP replay their recorded log-probs: not compiled by default in bf16/fp16 (see plumbing/compiling.py)
    assert compiling.wanted("auto", "cuda", torch.float32, replays=True)
    assert not compiling.wanted("auto", "cuda", torch.bfloat16, replays=True)
    assert compiling.wanted("auto", "cuda", torch.bfloat16, replays=False)
    assert compiling.wanted("on", "cuda", torch.bfloat16, replays=True)  # asked for: a warning, not a refusal
    assert compiling.wanted("True", "cpu") and not compiling.wanted("false", "cuda")  # nanoGPT's spelling
    with pytest.raises(SystemExit, match="--compile must be auto, on or off, got 'maybe'"):
        compiling.check("maybe")
    defaults = dict(compile="auto", seed=0)
    assert configurator.parse(["--compile"], defaults)["compile"] == "on"  # a bare flag, nanoGPT-style
    assert configurator.parse(["--compile", "--seed=3"], defaults) == dict(compile="on", seed=3)
    assert configurator.parse(["--compile", "off"], defaults)["compile"] == "off"
    assert configurator.parse(["--compile=off"], defaults)["compile"] == "off"


def test_compare_passes_compile_to_every_run(tiny_pipeline_dir, prompt_file, monkeypatch):
    """experiments/compare.py's auto: on where the machine can compile (here: with a C++ compiler on the PATH or not)."""
    from test_compare import configured
    argv = [f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", "--reward=jpeg_incompressibility", "--seeds=1"]
    cases = (("on", "", "", "on"), ("off", "g++", "", "off"), ("auto", "g++", "", "on"), ("auto", "", "", "off"),
             ("auto", "g++", "--precision=bf16", "off"))  # DDPO replays its log-probs: fp32 only
    for given, cxx, args, expected in cases:
        monkeypatch.setattr(compiling.shutil, "which", lambda c: "/usr/bin/" + c if cxx and c == cxx else None)
        monkeypatch.delenv("CXX", raising=False)
        runs = configured(*argv, f"--compile={given}", f"--args={args}").plan()[1]
        assert all(f"--compile={expected}" in r["argv"] and r["config"]["compile"] == expected for r in runs)
    with pytest.raises(SystemExit, match="--args must not set --compile"):
        configured(*argv, "--args=--compile=on").plan()


def test_compiled_unet_matches_eager():
    """Sampling (no gradient), training (the LoRA's gradient) and the pretrained model (lora.disabled,
    PRDP's reference: another graph) through the compiled UNet, against the same UNet run eagerly.
    Compiled by Dynamo and AOTAutograd, as --compile does, but without Inductor's code generation
    (100 s for these three graphs on 2 cores); Inductor's kernels on the shapes world: docs/performance.md, "Where
    the time goes" (the same first-epoch reward and clip fraction as eager, ratio_dev 2.4e-7)."""
    pipe = tiny_pipeline()
    lora.inject(pipe.unet, rank=2)
    torch.manual_seed(1)
    for m in lora.layers(pipe.unet).values():  # B = 0 would hide the low-rank path
        torch.nn.init.normal_(m.lora_B, std=0.1)
    eager = copy.deepcopy(pipe.unet)
    assert compiling.unet(pipe.unet, "on", "cpu", backend="aot_eager") and not compiling.unet(eager, "off", "cpu")
    assert pipe.unet._compiled_call_impl is not None and eager._compiled_call_impl is None
    cond = sampling.encode_prompts(pipe, ["a red circle", "a blue square"])
    uncond = sampling.unconditional(pipe)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 300])
    with torch.no_grad():
        assert torch.allclose(sampling.guided_eps(pipe.unet, x, t, cond, uncond, 5.0),
                              sampling.guided_eps(eager, x, t, cond, uncond, 5.0), atol=1e-5)
        with lora.disabled(pipe.unet), lora.disabled(eager):
            ref_c = sampling.guided_eps(pipe.unet, x, t, cond, uncond, 5.0)
            ref_e = sampling.guided_eps(eager, x, t, cond, uncond, 5.0)
        assert torch.allclose(ref_c, ref_e, atol=1e-5)
        assert not torch.allclose(ref_c, sampling.guided_eps(eager, x, t, cond, uncond, 5.0), atol=1e-3)
    grads = []
    for unet in (pipe.unet, eager):
        sampling.guided_eps(unet, x, t, cond, uncond, 5.0).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in unet.named_parameters() if "lora_" in n]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # in place: the same parameters under the same names, so checkpoints and LoRA files are unchanged
    assert list(pipe.unet.state_dict()) == list(eager.state_dict())
