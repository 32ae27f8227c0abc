"""lora.py against three references: the base model, the merged matrix W + (alpha/r) B A, and
diffusers' own `load_lora_weights` (through peft) on a fresh pipeline. CPU, offline, tiny UNet."""
import pytest
import torch
import torch.nn as nn

import lora
from experiments.gpu_memory import SD15_UNET  # Stable Diffusion 1.5's UNet config
from conftest import tiny_pipeline


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        return unet(x.to(unet.dtype), torch.tensor([10, 700]), c.to(unet.dtype)).sample.float()


def randomise(unet, seed=1):
    """Give every A and B random values, so the update is far from zero and differs per layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [p for m in lora.layers(unet).values() for p in (m.lora_A, m.lora_B)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_inject_zero_B_is_the_base_model_and_freezes_the_rest():
    unet = tiny_pipeline().unet
    before = unet_out(unet)
    n_frozen = sum(p.numel() for p in unet.parameters())
    params = lora.inject(unet, rank=4)
    assert torch.equal(unet_out(unet), before)
    # tiny UNet: 4 transformer blocks (down 1, mid 1, up 2), each attn1 + attn2 with q, k, v, out: 32 layers
    assert len(params) == 64 and all(p.dtype == torch.float32 for p in params)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert sum(p.numel() for p in unet.parameters()) == n_frozen + sum(p.numel() for p in params)
    assert all(not m.lora_B.any() for m in unet.modules() if isinstance(m, lora.LoRALinear))


def test_layer_equals_merged_matrix_and_fp16_base_keeps_fp32_factors():
    base = nn.Linear(6, 5).half()
    holder = nn.Module()
    holder.to_q = base
    (A, B) = lora.inject(holder, rank=3, alpha=6.0, targets=("to_q",))
    with torch.no_grad():
        A.normal_(), B.normal_()
    x = torch.randn(4, 6).half()
    y = holder.to_q(x)
    assert y.dtype == torch.float16 and A.dtype == B.dtype == torch.float32
    W = base.weight.float() + (6.0 / 3) * B @ A  # Hu et al. eq. 3
    torch.testing.assert_close(y.float(), x.float() @ W.T + base.bias.float(), atol=2e-2, rtol=1e-2)
    y.float().sum().backward()  # gradient reaches A and B through the fp16 base
    assert A.grad is not None and B.grad.abs().sum() > 0


def test_fp16_unet_keeps_fp32_factors_and_matches_the_fp32_model():
    ref = tiny_pipeline(seed=0).unet
    lora.inject(ref, rank=4, alpha=2.0)
    randomise(ref)
    half = tiny_pipeline(seed=0).unet.half()
    base = unet_out(half)
    lora.inject(half, rank=4, alpha=2.0)
    assert torch.equal(unet_out(half), base)
    assert {p.dtype for m in lora.layers(half).values() for p in (m.lora_A, m.lora_B)} == {torch.float32}
    randomise(half)
    # fp16 rounding of the base is ~1e-3 here; the LoRA update itself (~0.2) must be there in full
    assert (unet_out(half) - unet_out(ref)).abs().max() < 1e-2 < (base - unet_out(ref)).abs().max()


@pytest.mark.parametrize("rank,alpha,to_file", [(4, None, False), (4, 1.5, True), (2, 8.0, False)])
def test_diffusers_load_lora_weights_reproduces_our_unet(tmp_path, rank, alpha, to_file):
    pipe = tiny_pipeline(seed=0)
    base = unet_out(pipe.unet)
    lora.inject(pipe.unet, rank=rank, alpha=alpha)
    randomise(pipe.unet)
    ours = unet_out(pipe.unet)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the output
    path = tmp_path / "w.safetensors" if to_file else tmp_path / "run"
    lora.save(pipe.unet, path)
    fresh = tiny_pipeline(seed=0)  # same seed: same base weights
    assert torch.equal(unet_out(fresh.unet), base)
    fresh.load_lora_weights(str(path))
    torch.testing.assert_close(unet_out(fresh.unet), ours, atol=1e-5, rtol=0)


def sdxl_shaped_unet():
    """SDXL's UNet features at toy size: text_time added conditioning, 2 transformer layers per block,
    linear projections, per-level head dims."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4)


def test_sdxl_shaped_unet_round_trips_through_diffusers(tmp_path):
    def out(unet):
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
        cond = {"text_embeds": torch.randn(2, 8, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
        with torch.no_grad():
            return unet(x, torch.tensor([10, 700]), c, added_cond_kwargs=cond).sample
    unet = sdxl_shaped_unet()
    base = out(unet)
    lora.inject(unet, rank=4, alpha=8.0)
    assert torch.equal(out(unet), base)
    randomise(unet)
    lora.save(unet, tmp_path)
    fresh = sdxl_shaped_unet()
    fresh.load_lora_adapter(str(tmp_path), prefix="unet", use_safetensors=True)  # what the SDXL pipeline calls
    torch.testing.assert_close(out(fresh), out(unet), atol=1e-5, rtol=0)
    assert (out(unet) - base).abs().max() > 1e-2


@pytest.mark.parametrize("inject_first", [False, True])
def test_save_then_load_is_identical(tmp_path, inject_first):
    pipe = tiny_pipeline(seed=0)
    lora.inject(pipe.unet, rank=4, alpha=2.0)
    randomise(pipe.unet)
    lora.save(pipe.unet, tmp_path)
    fresh = tiny_pipeline(seed=0).unet
    if inject_first:
        lora.inject(fresh, rank=4, alpha=2.0)
    lora.load(fresh, tmp_path)
    assert torch.equal(unet_out(fresh), unet_out(pipe.unet))
    assert [p.requires_grad for p in fresh.parameters()].count(True) == 64


def test_state_dict_round_trip_keeps_alpha():
    pipe = tiny_pipeline(seed=0)
    lora.inject(pipe.unet, rank=2, alpha=3.0)
    randomise(pipe.unet)
    fresh = tiny_pipeline(seed=0).unet
    lora.load_state_dict(fresh, lora.state_dict(pipe.unet))
    assert torch.equal(unet_out(fresh), unet_out(pipe.unet))
    assert {m.alpha for m in fresh.modules() if isinstance(m, lora.LoRALinear)} == {3.0}


def test_inject_twice_and_no_targets_are_errors():
    unet = tiny_pipeline().unet
    lora.inject(unet, rank=4)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.inject(unet, rank=4)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(tiny_pipeline().unet, targets=("to_nothing",))


Q1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_mismatches_are_clear_errors_naming_the_first_one(tmp_path):
    pipe = tiny_pipeline()
    lora.inject(pipe.unet, rank=4)
    lora.save(pipe.unet, tmp_path / "r4.safetensors")
    rank2 = tiny_pipeline().unet
    lora.inject(rank2, rank=2)
    with pytest.raises(ValueError, match=rf"first mismatch at '{Q1}': shapes of A, B saved \(\(4, 8\), \(8, 4\)\), "
                                         r"in this UNet \(\(2, 8\), \(8, 2\)\)"):
        lora.load(rank2, tmp_path / "r4.safetensors")
    q_only = tiny_pipeline().unet
    lora.inject(q_only, targets=("to_q",))  # the file also has to_k: reported as having no such layer here
    with pytest.raises(ValueError, match=rf"first mismatch at '{Q1[:-1]}k': .* in this UNet None"):
        lora.load(q_only, tmp_path / "r4.safetensors")
    other_model = tiny_pipeline().unet  # no LoRA yet: load would inject, but a saved path is not a layer here
    sd = {k.replace("attn2", "attn9"): v for k, v in lora.state_dict(pipe.unet).items()}
    with pytest.raises(ValueError, match=r"'down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q' is not an nn"):
        lora.load_state_dict(other_model, sd)
    assert not lora.layers(other_model)  # the failed load left the UNet untouched
    del sd[Q1 + ".lora_B"]
    with pytest.raises(ValueError, match=rf"'{Q1}' lacks one of lora_A, lora_B and alpha"):
        lora.load_state_dict(other_model, sd)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "r4.safetensors")
    tensors["text_encoder.x.lora_A.weight"] = torch.zeros(1, 1)
    save_file(tensors, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match="unexpected key 'text_encoder.x.lora_A.weight'"):
        lora.load(tiny_pipeline().unet, tmp_path / "te.safetensors")


def test_merge_unmerge():
    unet = tiny_pipeline().unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    lora.inject(unet, rank=4, alpha=3.0)
    randomise(unet)
    adapted = unet_out(unet)
    lora.merge(unet)
    torch.testing.assert_close(unet_out(unet), adapted, atol=1e-5, rtol=1e-5)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    m = unet.get_submodule(name)
    torch.testing.assert_close(m.weight, weights[name + ".weight"] + (3.0 / 4) * m.lora_B @ m.lora_A)
    with pytest.raises(RuntimeError, match="unmerge"):  # training a merged model would silently do nothing
        unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 16))
    lora.unmerge(unet)
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items() if "lora_" not in k)
    assert torch.equal(unet_out(unet), adapted)


def test_disabled_is_the_pretrained_unet_bit_for_bit_and_restores():
    """PRDP's reference model: inside `lora.disabled` the trained UNet computes exactly what it did
    before injection; after it (also after an exception) the adapter is back, and so is the gradient."""
    unet = tiny_pipeline().unet
    base = unet_out(unet)
    lora.inject(unet, rank=4)
    randomise(unet)
    adapted = unet_out(unet)
    assert (adapted - base).abs().max() > 1e-2
    with lora.disabled(unet):
        assert torch.equal(unet_out(unet), base)
        with lora.disabled(unet):  # nested: the inner exit leaves the outer one disabled
            pass
        assert torch.equal(unet_out(unet), base)
    assert torch.equal(unet_out(unet), adapted)
    with pytest.raises(KeyError):
        with lora.disabled(unet):
            raise KeyError("boom")
    assert torch.equal(unet_out(unet), adapted)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 16)
    with lora.disabled(unet):  # no LoRA in the forward pass: no graph to A and B
        assert not unet(x, t, c).sample.requires_grad
    unet(x, t, c).sample.sum().backward()
    assert all(m.lora_B.grad is not None for m in lora.layers(unet).values())
    lora.merge(unet)
    with pytest.raises(ValueError, match="unmerge"):
        with lora.disabled(unet):
            pass


def test_sd15_rank4_parameter_count():
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # shapes only: no weights allocated, nothing downloaded
        unet = UNet2DConditionModel(**SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the published SD 1.5 UNet size
    linears = [m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(
        ("to_q", "to_k", "to_v", "to_out.0"))]
    by_layers = sum(4 * (m.in_features + m.out_features) for m in linears)
    # By hand: 16 transformer blocks (down 2+2+2, mid 1, up 3+3+3) of width C. Self-attention: 4 layers
    # C->C, 4*2C each. Cross-attention: q and out C->C, k and v 768->C. Per block 56C + 2*4*768.
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    by_hand = sum(56 * C + 6144 for C in widths)
    params = lora.inject(unet, rank=4)
    count = sum(p.numel() for p in params)
    assert count == by_layers == by_hand == 797_184
    assert len(linears) == 128 and len(params) == 256


def test_sdxl_rank4_parameter_count():
    from diffusers import UNet2DConditionModel
    from experiments.gpu_memory import SDXL_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    # By hand: 70 transformer blocks, 10 of width 640 (down 2 x 2, up 3 x 2) and 60 of 1280 (down 2 x 10,
    # mid 10, up 3 x 10). Per block, as SD 1.5's but with k and v from 2048 features: 56C + 2*4*2048.
    by_hand = 10 * (56 * 640 + 16384) + 60 * (56 * 1280 + 16384)
    params = lora.inject(unet, rank=4)
    assert sum(p.numel() for p in params) == by_hand == 5_806_080
    assert len(params) == 2 * 4 * 2 * 70  # A and B of q, k, v, out of 2 attentions per block
