"""Shared test fixtures: tiny random-weight models built through the same classes as SD 1.5, so the
real code paths run offline in milliseconds."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup without it can hang on these machines
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker (and per process it starts), as
    os.environ["OMP_NUM_THREADS"] = "1"    # two torch processes of two threads each on two cores run many times slower
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs scripts as subprocesses, under torchrun, or whole comparisons "
                                       "and benchmarks; `python -m pytest -m 'not slow' tests` skips them")


def tiny_pipeline(prediction_type="epsilon", seed=0, max_length=16):
    """A StableDiffusionPipeline with a tiny random UNet, VAE and CLIP text encoder (SD-shaped:
    4 latent channels, x2 VAE, cross-attention on text tokens), a DDIM scheduler and the real
    CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from shapes.models import clip_tokenizer

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


def tiny_sdxl_pipeline(seed=0, max_length=16, force_zeros_for_empty_prompt=True):
    """A StableDiffusionXLPipeline of tiny random parts shaped as SDXL's: a UNet with "text_time"
    added conditioning (the pooled text embedding and 6 time ids) and cross-attention on both text
    encoders' token states side by side (16 + 24 features), a CLIPTextModel and a
    CLIPTextModelWithProjection (whose projection is the pooled embedding), the real CLIP tokenizer
    twice (the second padding with "!", as SDXL's tokenizer_2 does), the tiny SD VAE (force_upcast,
    as SDXL's), and SDXL's scheduler: Euler, with the DDIM keys its config carries."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from shapes.models import clip_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=max_length, bos_token_id=49406, eos_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, projection_dim=16, hidden_act="quick_gelu", **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=8, hidden_act="gelu",
                                                                **text))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 24, attention_head_dim=(2, 4),
        norm_num_groups=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4)  # pooled (text_encoder_2's projection) + 6 time ids x 4
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)  # in SDXL's scheduler_config.json too
    tokenizer_2 = clip_tokenizer(max_length)
    tokenizer_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(vae=tiny_pipeline(seed=seed).vae, text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(max_length),
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed=0, max_length=16, t5=False):
    """A StableDiffusion3Pipeline of tiny random parts shaped as SD 3.5's: an SD3Transformer2DModel (16
    latent channels, 2x2 patches, joint attention over the text tokens, the pooled text embedding
    added to the timestep's), two CLIPTextModelWithProjection (16 + 24 token features, zero-padded to
    the transformer's 48; 8 + 8 pooled), no T5 (the pipeline then uses zeros for its 256 tokens) or,
    with `t5`, a one-layer T5EncoderModel of width 48 with a 30-piece T5 tokenizer built offline, a
    VAE with 16 latent channels and SD 3.5's scaling and shift factors, and SD 3.5's scheduler
    (flow-matching Euler, shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer
    from shapes.models import clip_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=max_length, bos_token_id=49406, eos_token_id=49407, projection_dim=8)
    text_encoder_3 = tokenizer_3 = None
    if t5:  # a unigram vocabulary of a few words and letters (T5's own is SentencePiece's, 32k pieces)
        pieces = "▁a ▁red ▁blue ▁circle ▁square ▁cat ▁dolphin ▁riding ▁bike ▁ a b c d e g h i k l n o p q r s t u".split()
        tokenizer_3 = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                                  + [(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=48, d_kv=8, d_ff=32,
                                                 num_layers=1, num_heads=2)).eval()  # no dropout, as loaded
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, hidden_act="quick_gelu", **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, hidden_act="gelu", **text))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(max_length),
                                    text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(max_length),
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SD-shaped pipeline saved as a diffusers folder (what `--model=<folder>` loads), in the
    form both transformers lines read, as the project saves its pipelines."""
    from shapes.models import save_pipeline
    path = tmp_path_factory.mktemp("tiny_sd")
    save_pipeline(tiny_pipeline(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """A micro build of the shapes world (seconds; its quality is meaningless), in its own cache."""
    from shapes import build as shapes_build
    return shapes_build.ensure_world(micro=True, cache=str(tmp_path_factory.mktemp("micro_world")))


# each trainer at its smallest on the tiny SD-shaped folder (with --model, --prompts and --epochs): seconds an epoch
TINY = {"train_ddpo": ["--reward=jpeg_incompressibility", "--num_steps=2", "--sample_batch_size=2",
                       "--samples_per_prompt=2", "--num_batches=1", "--train_batch_size=2", "--stat_min_count=2"],
        "train_alignprop": ["--reward=shapes_appeal", "--num_steps=2", "--batch_size=2", "--steps_per_epoch=1"],
        "train_prdp": ["--reward=jpeg_incompressibility", "--num_steps=2", "--prompts_per_epoch=1",
                       "--images_per_prompt=2", "--sample_batch_size=2", "--train_batch_size=2", "--updates_per_epoch=1"]}
TINY = {script: args + ["--eval_prompts=1", "--eval_seeds=1"] for script, args in TINY.items()}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL-shaped pipeline saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """The tiny SD3-shaped pipeline, with its T5, saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("tiny_sd3_t5")
    tiny_sd3_pipeline(t5=True).save_pretrained(path)
    return str(path)


def run_trainer(name, *argv):
    """Run a training script in this process, as `python <name>.py <argv>` would (configurator.fresh,
    then its main()). Returns the module, whose globals hold the config."""
    from plumbing import configurator
    mod = configurator.fresh(name, argv)
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
    """Run `script` under torchrun (gloo on CPU), one thread per process; returns the result, or fails
    the test with what the ranks printed (not the launcher's own traceback, which says only that a rank
    died and would push the ranks' messages out of pytest's report)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(root, script), *[str(a) for a in argv]]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode != 0:
        ranks = res.stderr.split("torch.distributed.elastic.multiprocessing.api")[0]
        exits = [line for line in res.stderr.splitlines() if "exitcode" in line or "rank  " in line]
        pytest.fail(f"torchrun exited {res.returncode}; {exits}; the ranks printed:\n{ranks[-4000:]}")
    return res


# ---- tiny random reward models with the real rewards' code paths (aesthetic, PickScore) ----

# the published predictor's state dict, as the LAION repo's nn.Sequential names it
# (Linear layers at indices 0, 2, 4, 6, 7; dropouts in between have no weights)
PUBLISHED_SHAPES = {"layers.0": (1024, 768), "layers.2": (128, 1024), "layers.4": (64, 128),
                    "layers.6": (16, 64), "layers.7": (1, 16)}


def random_predictor_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (o, i) in PUBLISHED_SHAPES.items():
        sd[k + ".weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        sd[k + ".bias"] = torch.randn(o, generator=g) * 0.1
    return sd


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip model registered as a custom config (through open_clip's factory, as
    ViT-L-14 is), with 768-d embeddings so the predictor-shaped MLP fits; saved weights + MLP."""
    import json
    import open_clip
    d = tmp_path_factory.mktemp("oc")
    cfg = {"embed_dim": 768,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "rewards-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "rewards-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("rewards-tiny-clip", force_quick_gelu=True)
    torch.save(model.state_dict(), d / "clip.pt")
    torch.save(random_predictor_state(), d / "mlp.pth")
    return "rewards-tiny-clip", str(d / "clip.pt"), str(d / "mlp.pth")


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    """A tiny transformers CLIPModel and a CLIPProcessor (real CLIP tokenizer, CLIP image settings
    at 32 px), saved as local folders as the hub ones would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from shapes.models import clip_tokenizer
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=clip_tokenizer())
    d = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(d / "model")
    proc.save_pretrained(d / "processor")
    return model, proc, str(d / "model"), str(d / "processor")


def record_sampling(monkeypatch):
    """Record what the trainers draw: every rollout's initial noise and every batch of prompts
    encoded (the texts, weighted or not; not the empty prompt), in call order."""
    import sampling
    seen = dict(noise=[], prompts=[])
    real_noise, real_encode = sampling.initial_noise, sampling.encode_prompts

    def initial_noise(*a, **k):
        x = real_noise(*a, **k)
        seen["noise"].append(x.clone())
        return x

    def encode_prompts(pipe, prompts, weights=None):
        if list(prompts) != [""]:
            seen["prompts"].append(list(prompts))
        return real_encode(pipe, prompts, weights)

    monkeypatch.setattr(sampling, "initial_noise", initial_noise)
    monkeypatch.setattr(sampling, "encode_prompts", encode_prompts)
    return seen


@pytest.fixture
def one_thread():
    """Timings with one torch thread: on a busy machine, two spinning OpenMP threads per process
    make every op wait for a core and the times swing tenfold (measured: a tiny epoch in 0.3 s with
    one thread, 7 s with two, while another process trained)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
