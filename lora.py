"""LoRA on the attention projections of the UNet (or SD 3.5's transformer), by hand (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685). A frozen linear layer gets a
low-rank update (eq. 3),
    y = W x + b + (alpha / r) B A x,      A: [r, in] Gaussian,   B: [out, r] zeros,
so an injected model is exactly the base model until trained, and a layer trains r (in + out) numbers
instead of in * out. `save` writes the keys diffusers' `pipe.load_lora_weights` reads for a UNet LoRA
(`unet.<module path>.lora_A.weight` / `.lora_B.weight`), or, for SD 3.5's SD3Transformer2DModel, for a
transformer LoRA (`transformer.<module path>...`): a run's weights load there with no conversion.
The functions take the denoiser as `unet`, whichever it is (sampling.denoiser(pipe)).
"""
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from plumbing import runs
# every self- and cross-attention's q, k, v, out, in SD 1.5's UNet and SDXL's alike (SDXL's other linear
# layers, the feed-forwards, the transformers' in/out projections and the time/added-conditioning MLPs, stay frozen);
# SD 3.5's joint attention (Esser et al. 2024, Fig. 2) has these for the image tokens and a second set for the
# text tokens, add_{q,k,v}_proj and to_add_out, trained too (as diffusers' SD3 LoRA script does; the UNets have none)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FILE_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers looks for in a folder


class LoRALinear(nn.Linear):
    """An nn.Linear sharing the frozen weight and bias of the layer it replaces, plus (alpha/r) B A.
    Being an nn.Linear keeps the UNet's own keys (`...to_q.weight`) and isinstance checks unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: no copy
        # A and B stay fp32 even on an fp16 base: small updates to B would round away in fp16.
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        # Gaussian A (Hu et al., Sec. 4.1) with std 1/r, as in the diffusers LoRA layer that DDPO and
        # AlignProp trained with, so their learning rates carry over. B = 0 makes B A = 0 at the start.
        nn.init.normal_(self.lora_A, std=1.0 / rank)
        self.rank, self.alpha = rank, float(alpha)
        self.unmerged_weight = None  # a copy of W while (alpha/r) B A is merged into it
        self.enabled = True  # False inside `disabled(unet)`: the base layer alone

    def scaled_B(self):
        # Scale B rather than the output: `save` writes exactly this tensor, so a loader that assumes
        # alpha = r (scale 1), as diffusers does for this format, computes the very same product.
        return self.lora_B * (self.alpha / self.rank)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.unmerged_weight is not None:  # merged: W already holds the update
            if torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise RuntimeError("LoRA is merged into the base weights, so A and B get no gradient: call "
                                   "lora.unmerge(unet) before training, or sample under torch.no_grad()")
            return y
        if not self.enabled:  # the pretrained layer, exactly: the low-rank path is not even computed
            return y
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.scaled_B())
        return y + h.to(y.dtype)


def layers(unet):  # {module path: LoRALinear}, in module order
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def _wrap(unet, names, ranks, alphas):
    unet.requires_grad_(False)  # only A and B, created below, will train
    for name, rank, alpha in zip(names, ranks, alphas):
        parent, _, child = name.rpartition(".")  # "...attn1.to_out.0": the parent is the ModuleList to_out
        setattr(unet.get_submodule(parent), child, LoRALinear(unet.get_submodule(name), rank, alpha))


def inject(unet, rank=4, alpha=None, targets=DEFAULT_TARGETS):
    """Wrap each nn.Linear whose path ends in one of `targets`; freeze the rest; return A and B of all."""
    if layers(unet):
        raise ValueError("the UNet already has LoRA layers; inject once, or start from a fresh UNet")
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model has a module path ending in one of {tuple(targets)}")
    _wrap(unet, names, [rank] * len(names), [rank if alpha is None else alpha] * len(names))
    return [p for m in layers(unet).values() for p in (m.lora_A, m.lora_B)]


def state_dict(unet):
    """The training state for resume checkpoints: A, B (unscaled, as the optimiser sees them), alpha."""
    return {f"{name}.{key}": m.alpha if key == "alpha" else getattr(m, key).detach().clone()
            for name, m in layers(unet).items() for key in ("lora_A", "lora_B", "alpha")}


def misfit(unet, sd):
    """Why the LoRA layers `sd` (what `state_dict` returned) cannot go into `unet`, in one line; None
    if they fit: every saved layer complete, and an nn.Linear of this UNet of the saved sizes
    (A [r, in], B [out, r]). A resume checkpoint of another model behind the same --model fails here."""
    saved = list(dict.fromkeys(k.rpartition(".")[0] for k in sd))  # module paths, in saved order
    if bad := [n for n in saved if {n + ".lora_A", n + ".lora_B", n + ".alpha"} - sd.keys()]:
        return f"{bad[0]!r} lacks one of lora_A, lora_B and alpha"
    modules = dict(unet.named_modules())
    for n in saved:
        m, (r, d_in), (d_out, r_b) = modules.get(n), sd[n + ".lora_A"].shape, sd[n + ".lora_B"].shape
        if not isinstance(m, nn.Linear):
            return f"{n!r} is not an nn.Linear of this UNet"
        if (d_in, d_out, r) != (m.in_features, m.out_features, r_b):
            return (f"{n!r}: the saved A {(r, d_in)} and B {(d_out, r_b)} do not fit this UNet's {m.in_features} -> "
                    f"{m.out_features} layer")
    return None


def load_state_dict(unet, sd, source="state dict"):
    """Restore what `state_dict` returned, bit for bit; a UNet without LoRA gets the saved layers first."""
    if why := misfit(unet, sd):
        raise ValueError(f"{source}: {why}; saved from another model?")
    saved = list(dict.fromkeys(k.rpartition(".")[0] for k in sd))  # module paths, in saved order
    if not layers(unet):
        _wrap(unet, saved, [sd[n + ".lora_A"].shape[0] for n in saved], [float(sd[n + ".alpha"]) for n in saved])
    ours = {n: (tuple(m.lora_A.shape), tuple(m.lora_B.shape)) for n, m in layers(unet).items()}
    theirs = {n: (tuple(sd[n + ".lora_A"].shape), tuple(sd[n + ".lora_B"].shape)) for n in saved}
    if bad := [n for n in list(ours) + saved if ours.get(n) != theirs.get(n)]:
        raise ValueError(f"{source}: first mismatch at {bad[0]!r}: shapes of A, B saved {theirs.get(bad[0])}, in "
                         f"this UNet {ours.get(bad[0])} (None: no such layer). Another model, rank or targets?")
    unmerge(unet)  # W must be the base weight again before A and B change
    with torch.no_grad():
        for name, m in layers(unet).items():
            m.lora_A.copy_(sd[name + ".lora_A"]), m.lora_B.copy_(sd[name + ".lora_B"])
            m.alpha = float(sd[name + ".alpha"])


def save(unet, path):
    """Write the adapter for diffusers: a `.safetensors` file, or a folder receiving FILE_NAME.
    B is stored as (alpha/r) B (see LoRALinear.scaled_B), so the file needs no alphas. Non-finite
    weights are refused (an existing file stays as it was)."""
    if not layers(unet):
        raise ValueError("the UNet has no LoRA layers to save; call lora.inject(unet) first")
    path = str(path) if str(path).endswith(".safetensors") else os.path.join(path, FILE_NAME)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # the pipeline component the keys name, as diffusers' loaders look for it (pipe.unet, or SD 3.5's pipe.transformer)
    prefix = "transformer" if type(unet).__name__ == "SD3Transformer2DModel" else "unet"
    tensors = {f"{prefix}.{name}.lora_{k}.weight": (m.lora_A if k == "A" else m.scaled_B()).detach().cpu().contiguous()
               for name, m in layers(unet).items() for k in "AB"}
    if bad := [k for k, t in tensors.items() if not torch.isfinite(t).all()]:
        raise ValueError(f"LoRA weight {bad[0]} is not finite; not saved to {path}")
    # write, flush, then rename: a crash never leaves a half-written file
    runs.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def weights_file(path):
    """The LoRA file a user points at: `path` itself, or FILE_NAME in it or in its lora/ folder (a
    trainer's run folder); None if there is none."""
    for candidate in (path, os.path.join(path, FILE_NAME), os.path.join(path, "lora", FILE_NAME)):
        if os.path.isfile(candidate):
            return candidate
    return None


def load(unet, path):
    """Load a file from `save` (or any diffusers-format UNet or SD 3.5 transformer LoRA with alpha = rank),
    injecting if needed.
    Layers come back with alpha = r and B = (alpha/r) B, the very tensors the saved model multiplied, so
    outputs are identical. (Resume training from `state_dict` instead: it keeps the original alpha.)"""
    path = os.path.join(path, FILE_NAME) if os.path.isdir(path) else str(path)
    try:
        saved = load_file(path)
    except (OSError, SafetensorError) as e:  # unreadable; truncated, empty or not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file ({e}); pass a {FILE_NAME} a trainer saved")
    sd = {}
    for key, t in saved.items():
        component, _, rest = key.partition(".")  # what `save` wrote: unet, or SD 3.5's transformer
        name, _, kind = rest.rpartition(".lora_")
        if component not in ("unet", "transformer") or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: unexpected key {key!r}; expected a UNet LoRA in diffusers' format, "
                             "'unet.<module path>.lora_A.weight' and '.lora_B.weight' (SD 3.5: 'transformer.<...>')")
        sd[f"{name}.lora_{kind[0]}"] = t
        sd[f"{name}.alpha"] = t.shape[0] if kind == "A.weight" else t.shape[1]  # alpha = r: B holds the scale
    load_state_dict(unet, sd, source=path)


@contextlib.contextmanager
def disabled(unet):
    """`with lora.disabled(unet):` the UNet is the pretrained model again, bit for bit (y = W x + b in
    every LoRA layer), and A, B are left untouched; on exit (also on an exception) each layer is
    switched back as it was. PRDP's reference model p_ref is the trained UNet inside this block: no
    second copy of the UNet in memory. A merged UNet is refused: its W holds the update."""
    if any(m.unmerged_weight is not None for m in layers(unet).values()):
        raise ValueError("lora.disabled needs an unmerged UNet (W holds the update while merged); call lora.unmerge(unet) first")
    before = {m: m.enabled for m in layers(unet).values()}
    for m in before:
        m.enabled = False
    try:
        yield unet
    finally:
        for m, was in before.items():
            m.enabled = was


def merge(unet):
    """Fold (alpha/r) B A into W for sampling at base speed. W is copied so `unmerge` is exact (subtracting
    the update would leave rounding error in W, in fp16 a drift growing with each merge/unmerge cycle)."""
    with torch.no_grad():
        for m in layers(unet).values():
            if m.unmerged_weight is None:
                m.unmerged_weight = m.weight.detach().clone()
                m.weight.add_((m.scaled_B() @ m.lora_A).to(m.weight.dtype))


def unmerge(unet):
    """Restore the base weights exactly, bit for bit."""
    with torch.no_grad():
        for m in layers(unet).values():
            if m.unmerged_weight is not None:
                m.weight.copy_(m.unmerged_weight)
                m.unmerged_weight = None
