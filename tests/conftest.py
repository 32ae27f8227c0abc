"""Shared test fixtures: tiny random-weight models built through the same classes as SD 1.5, so the
real code paths run offline in milliseconds."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup without it can hang on these machines
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch


def tiny_pipeline(prediction_type="epsilon", seed=0, max_length=16):
    """A StableDiffusionPipeline with a tiny random UNet, VAE and CLIP text encoder (SD-shaped:
    4 latent channels, x2 VAE, cross-attention on text tokens), a DDIM scheduler and the real
    CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from shapes import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=16))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=clip_tokenizer(max_length), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SD-shaped pipeline saved as a diffusers folder (what `--model=<folder>` loads)."""
    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_pipeline().save_pretrained(path)
    return str(path)


def run_trainer(name, *argv):
    """Run a training script in this process, as `python <name>.py <argv>` would (a fresh copy of
    its module-level defaults every time). Returns the module, whose globals hold the config."""
    import importlib
    import configurator
    mod = importlib.reload(importlib.import_module(name))
    mod.config = configurator.configure(vars(mod), [str(a) for a in argv])
    mod.main()
    return mod


def read_log(out):
    import json
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a (red circle) on a (dark background)\na (blue square)\nan (orange) (triangle)\n")
    return str(path)


def lora_weights(out):
    """The LoRA file a trainer run saved in `out`."""
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def torchrun(script, *argv, nproc=2):
    """Run `script` under torchrun (gloo on CPU), one thread per process; returns the result."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(root, script), *[str(a) for a in argv]]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
