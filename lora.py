"""LoRA on the UNet's attention projections, written out by hand (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", arXiv:2106.09685).

A frozen linear layer y = W x + b gets a trainable low-rank update (eq. 3 of the paper):

    y = W x + b + (alpha / r) B A x,      A: [r, in] Gaussian,   B: [out, r] zeros

so an injected model is exactly the base model until trained, and each layer trains r * (in + out)
numbers instead of in * out. `save` writes the key names diffusers' `pipe.load_lora_weights` reads
for a UNet LoRA (`unet.<module path>.lora_A.weight` / `.lora_B.weight`, PEFT's layout), so a run's
weights load in diffusers, and the tools built on it, with no conversion step.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every self- and cross-attention's q, k, v, out
FILE_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers looks for in a folder


class LoRALinear(nn.Linear):
    """An nn.Linear sharing the frozen weight and bias of the layer it replaces, plus (alpha/r) B A.
    Being an nn.Linear keeps the UNet's own keys (`...to_q.weight`) and isinstance checks unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: no copy
        # A and B stay fp32 even on an fp16 base: small updates to B would round away in fp16.
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        # Gaussian A (Hu et al., Sec. 4.1) with std 1/r, as in the diffusers LoRA layer that DDPO and
        # AlignProp trained with, so their learning rates carry over. B = 0 makes B A = 0 at the start.
        nn.init.normal_(self.lora_A, std=1.0 / rank)
        self.rank, self.alpha = rank, float(alpha)
        self.unmerged_weight = None  # a copy of W while (alpha/r) B A is merged into it

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
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.scaled_B())
        return y + h.to(y.dtype)


def _layers(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def parameters(unet):
    """The trainable LoRA parameters, A and B of every layer, in module order."""
    return [p for m in _layers(unet).values() for p in (m.lora_A, m.lora_B)]


def _wrap(unet, name, rank, alpha):
    parent, _, child = name.rpartition(".")  # "...attn1.to_out.0": parent is the ModuleList to_out
    parent = unet.get_submodule(parent)
    setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))


def inject(unet, rank=4, alpha=None, targets=DEFAULT_TARGETS):
    """Wrap every nn.Linear whose module path ends in one of `targets`; freeze everything else.
    Returns the trainable parameters. Injecting again with the same settings changes nothing."""
    alpha = float(rank if alpha is None else alpha)
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the UNet has a path ending in one of {tuple(targets)}")
    existing = _layers(unet)
    if existing:
        if set(existing) != set(names) or any((m.rank, m.alpha) != (rank, alpha) for m in existing.values()):
            m = next(iter(existing.values()))
            raise ValueError(f"the UNet already has {len(existing)} LoRA layers (rank {m.rank}, alpha {m.alpha}, "
                             f"e.g. {next(iter(existing))!r}); asked for rank {rank}, alpha {alpha} on "
                             f"{len(names)} layers. Inject once, or start from a fresh UNet.")
        return parameters(unet)
    unet.requires_grad_(False)
    for name in names:
        _wrap(unet, name, rank, alpha)
    return parameters(unet)


def state_dict(unet):
    """The raw training state for resume checkpoints: unscaled A and B and each layer's alpha."""
    sd = {}
    for name, m in _layers(unet).items():
        sd[name + ".lora_A"], sd[name + ".lora_B"] = m.lora_A.detach().clone(), m.lora_B.detach().clone()
        sd[name + ".alpha"] = torch.tensor(m.alpha)
    return sd


def _restore(unet, factors, source):
    """Copy {module path: (A, B, alpha)} into the UNet's LoRA layers, injecting them if there are none."""
    if any(m.unmerged_weight is not None for m in _layers(unet).values()):
        raise ValueError(f"{source}: the UNet's LoRA is merged; call lora.unmerge(unet) before loading")
    if not _layers(unet):
        modules = dict(unet.named_modules())
        for name, (A, B, alpha) in factors.items():
            if not isinstance(modules.get(name), nn.Linear):
                raise ValueError(f"{source}: {name!r} is not an nn.Linear of this UNet; was it saved from another model?")
        unet.requires_grad_(False)
        for name, (A, B, alpha) in factors.items():
            _wrap(unet, name, A.shape[0], alpha)  # the rank is read from the file
    layers = _layers(unet)
    for name in list(layers) + [n for n in factors if n not in layers]:  # report the first mismatch
        if name not in factors:
            raise ValueError(f"{source}: no weights for the UNet's LoRA layer {name!r}; inject with the targets "
                             "the file was saved with, or load into a UNet without LoRA so they are read from it")
        if name not in layers:
            raise ValueError(f"{source}: {name!r} is not a LoRA layer of this UNet (different targets or model?)")
        (A, B, _), m = factors[name], layers[name]
        if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
            raise ValueError(f"{source}: shape mismatch at {name!r}: saved A {tuple(A.shape)}, B {tuple(B.shape)}; "
                             f"UNet A {tuple(m.lora_A.shape)}, B {tuple(m.lora_B.shape)}. Same model and rank? "
                             "Loading into a UNet without LoRA reads the rank from the file.")
    with torch.no_grad():
        for name, m in layers.items():
            A, B, alpha = factors[name]
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
            m.alpha = float(alpha)


def load_state_dict(unet, sd):
    """Restore what `state_dict` returned (into a UNet with or without LoRA layers), bit for bit."""
    names = [k.removesuffix(".lora_A") for k in sd if k.endswith(".lora_A")]
    _restore(unet, {n: (sd[n + ".lora_A"], sd[n + ".lora_B"], float(sd[n + ".alpha"])) for n in names}, "state dict")


def save(unet, path):
    """Write the adapter for diffusers: a `.safetensors` file, or a folder receiving FILE_NAME.
    B is stored as (alpha/r) B (see LoRALinear.scaled_B), so no alpha needs to be stored."""
    from safetensors.torch import save_file
    if not _layers(unet):
        raise ValueError("the UNet has no LoRA layers to save; call lora.inject(unet) first")
    path = str(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, FILE_NAME)
    tensors = {}
    for name, m in _layers(unet).items():
        tensors[f"unet.{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = m.scaled_B().detach().cpu().contiguous()
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)  # write then rename: a crash never leaves a half-written file


def load(unet, path):
    """Load a file written by `save` (or any diffusers-format UNet LoRA that has alpha = rank), injecting
    first if needed. Layers come back with alpha = r and B = (alpha/r) B: the same tensors the saved model
    multiplied, so the outputs are identical (resume training from `state_dict` to keep the original alpha)."""
    from safetensors.torch import load_file
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    A, B = {}, {}
    for key, t in load_file(path).items():
        name, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        if not key.startswith("unet.") or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: unexpected key {key!r}; expected a UNet LoRA in diffusers' format, "
                             "'unet.<module path>.lora_A.weight' and '.lora_B.weight'")
        (A if kind == "A.weight" else B)[name] = t
    for name in [n for n in A if n not in B] + [n for n in B if n not in A]:
        raise ValueError(f"{path}: {name!r} has only one of lora_A / lora_B")
    _restore(unet, {n: (A[n], B[n], A[n].shape[0]) for n in A}, path)


def merge(unet):
    """Fold (alpha/r) B A into W so sampling runs at the base model's speed. A copy of W is kept so that
    `unmerge` is exact: subtracting the update again would leave rounding error in W (in fp16, a drift
    that grows with every merge/unmerge cycle). Costs one copy of the targeted weights while merged."""
    with torch.no_grad():
        for m in _layers(unet).values():
            if m.unmerged_weight is None:
                m.unmerged_weight = m.weight.detach().clone()
                m.weight.add_((m.scaled_B() @ m.lora_A).to(m.weight.dtype))


def unmerge(unet):
    """Restore the base weights exactly, bit for bit."""
    with torch.no_grad():
        for m in _layers(unet).values():
            if m.unmerged_weight is not None:
                m.weight.copy_(m.unmerged_weight)
                m.unmerged_weight = None
