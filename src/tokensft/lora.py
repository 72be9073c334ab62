"""A fused forward/backward for PEFT's plain LoRA linear layers (ours; the math is LoRA's, Hu et al. 2021,
arXiv:2106.09685, eq. 3).

PEFT computes `y = base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the three matmuls, a multiply and an add
over the full `(N, out)` output in the forward, their backward twins, and autograd's sum of the two gradients that
reach `x`. On a CPU those memory-bound passes cost as much as the LoRA matmuls themselves
(`benchmarks/bench_step_profile.py`). `FusedLoRALinear` computes the same function with the scaling folded into the
GEMMs:

    h = x A^T                       (N, r)
    y = x W^T + b;  y += s · h B^T  (one addmm into y)
    dh = s · g B;   dB = s · g^T h;  dA = dh^T x;  dx = g W + dh A   (one addmm into dx)

`fuse_lora(model)` switches every eligible `peft.tuners.lora.Linear` of a model to it. A layer takes the fused path
only on a call where PEFT's plain path would run the same math: adapters enabled and not merged, one active adapter,
no dropout, no DoRA or other variant, no LoRA bias, no hooks on the base layer or the adapter's linears (the tracer
hooks layers), no autocast (bf16 autocast keeps PEFT's path, which casts per op), no `torch.func` transform (the
alignment's JVPs), and equal dtypes. Otherwise the layer runs PEFT's own forward. Results equal PEFT's to float
rounding (the accumulations inside `addmm_` round once where PEFT's separate add rounds twice; tested).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

__all__ = ["FusedLoRALinear", "fuse_lora"]


class FusedLoRALinear(torch.autograd.Function):
    """`y = x W^T + b + s · (x A^T) B^T` with the scaling inside the GEMMs (module docstring).

    Args (forward):
        x: `(..., in)`; weight: `(out, in)` frozen base weight; bias: `(out,)` or None (frozen);
        lora_a: `(r, in)`; lora_b: `(out, r)`; scaling: float `s` (PEFT's `lora_alpha / r`).

    Returns:
        `(..., out)` in x's dtype. Gradients flow to x, lora_a and lora_b (and to weight / bias only if they require
        it, as for a full fine-tune through the adapter, which PEFT does not do: then they are computed too).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = x2 @ lora_a.t()  # (N, r)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape, ctx.has_bias = scaling, shape, bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        gh = (g2 @ lora_b).mul_(s) if (need_x or need_a) else None  # (N, r)
        gx = None
        if need_x:
            gx = g2 @ weight
            gx.addmm_(gh, lora_a)
            gx = gx.view(ctx.shape)
        g_w = g2.t() @ x2 if need_w else None
        g_bias = g2.sum(0) if (need_b and ctx.has_bias) else None
        g_a = gh.t() @ x2 if need_a else None
        g_b = (g2.t() @ h).mul_(s) if need_bb else None
        return gx, g_w, g_bias, g_a, g_b, None


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """Forward of a `fuse_lora`-ed layer: the fused path when it computes PEFT's plain LoRA math, else PEFT's."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or torch.is_autocast_enabled(x.device.type) or torch._C._are_functorch_transforms_active()):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(name, False)
            or not isinstance(self.lora_dropout[name], nn.Identity) or not isinstance(base, nn.Linear)
            or getattr(self, "fan_in_fan_out", False)):
        return self._peft_forward(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if _hooked(base, lora_a, lora_b) or lora_a.bias is not None or lora_b.bias is not None or not (
            x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return self._peft_forward(x, *args, **kwargs)
    return FusedLoRALinear.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, float(self.scaling[name]))


def fuse_lora(model: nn.Module) -> int:
    """Give every PEFT LoRA `Linear` layer of `model` the fused forward (`FusedLoRALinear`, falling back to PEFT's
    own forward per call where the fused one would not compute the same thing). Idempotent.

    Returns:
        the number of layers switched (0 for a model without LoRA layers, or without PEFT installed).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
