# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Int8 inference on CPU: `nn.Linear` layers with int8 weights and int8 activations quantised per row at run time.

A single composed query on a CPU reads every weight once per network call for a handful of rows, so its time is
set by memory traffic: float32 weights make a floor (bytes / read bandwidth) that no float32 kernel gets below.
Int8 weights read a quarter of the bytes, and the products of int8 rows with int8 weights run on the CPU's integer
dot-product instructions (AVX512-VNNI / AVX-VNNI) with exact int32 sums.

What each layer computes (`Int8DynamicLinear`):

* weights: symmetric int8 per output channel, `W ~ w_scale[n] * Wq[n, :]`, `w_scale = max|W[n, :]| / 127`;
* activations: symmetric int8 per row, quantised at every call, `x ~ x_scale[m] * xq[m, :]`; per row rather than
  per tensor because the rows of one call differ in scale (the noisy-embedding and time tokens of CompoDiff, or the
  tokens of a CLIP tower), and a shared scale leaves the small rows a few levels;
* `y[m, n] = x_scale[m] * w_scale[n] * sum_k xq[m, k] * Wq[n, k] + bias[n]`, the sum exact in int32, the scaling
  and the bias in float32.

Why not int8 weights with float arithmetic (weight-only quantisation)? On the x86 CPU measured here (AMD EPYC,
AVX512) torch's weight-only kernel (`_weight_int8pack_mm`) runs 7.5-27x *slower* than the float32 product on the
denoiser's and the text tower's shapes (the `int8-kernel` rows of benchmarks/results/amd-epyc-2core/
bench_compodiff_cpu.json; torchao's configurations are timed there too when torchao is installed), so it buys
accuracy nobody needs at a cost in time. The integer product runs on oneDNN's prepacked u8 x s8 kernel
(activations shifted by 128, the zero point removing the shift exactly), or on `torch._int_mm` where oneDNN cannot
run or disagrees with it on a first check.

Layers are inference-only (no backward) and CPU-only. `quantize_for_cpu` replaces plain `nn.Linear` layers of a
model in place; a model class can list module-name patterns to keep in float32 in `_keep_float32_on_cpu_int8`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice

__all__ = ["Int8DynamicLinear", "quantize_for_cpu", "int8_backend"]

WEIGHT_FORMATS = ("int8",)
_BACKEND: str | None = None  # "onednn", "int_mm" or "float", decided once per process by `int8_backend`


def quantize_rows(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: `(xq [M, K] int8 values held in float32, scale [M, 1])`, `x ~ scale * xq`."""
    amax = hidden_states.abs().amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(hidden_states * (127.0 / amax)), amax / 127.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: `(Wq [N, K] int8, scale [N] float32)`, `W ~ scale[:, None] * Wq`."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight * (127.0 / amax)[:, None]).to(torch.int8), amax / 127.0


def _onednn_product(rows: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """`xq @ Wq.T` as float32 (exact integer values) with oneDNN's u8 x s8 kernel: `xq + 128` with zero point 128."""
    shifted = (rows + 128.0).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        shifted, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _int_mm_product(rows: torch.Tensor, weight_kn: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(rows.to(torch.int8), weight_kn).float()


def _probe_backend() -> str:
    """The fastest integer product that gives the exact sums here (checked once on extreme values, where a
    saturating 16-bit pair sum (AVX2 without VNNI) would show)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(-127, 128, (5, 256), generator=generator).float()
    rows[0] = 127.0
    weight = torch.randint(-127, 128, (24, 256), generator=generator, dtype=torch.int8)
    weight[0] = 127
    exact = (rows.double() @ weight.double().T).float()
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        ones, zeros = torch.ones(24), torch.zeros(24, dtype=torch.long)
        if torch.equal(_onednn_product(rows, packed, ones, zeros), exact):
            return "onednn"
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    try:
        if torch.equal(_int_mm_product(rows, weight.T.contiguous()), exact):
            return "int_mm"
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return "float"


def int8_backend() -> str:
    """Which integer product `Int8DynamicLinear` uses in this process: `"onednn"` (prepacked oneDNN kernel),
    `"int_mm"` (`torch._int_mm`) or `"float"` (the int8 values multiplied in float32; correct, not fast)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _probe_backend()
    return _BACKEND


class Int8DynamicLinear(nn.Module):
    """An inference-only CPU stand-in for an `nn.Linear`: int8 weights (per output channel), int8 activations (per
    row, at every call), exact integer sums, float32 scaling (see the module docstring). Build it with
    :meth:`from_linear`; it returns the input's dtype. Its state is not saved: save the float model and quantise
    after loading."""

    compute_dtype = torch.float32  # what `models._dtype_cast.compute_dtype` reports for it

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple | None = None  # the weight in the backend's layout, made at the first call

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        if linear.weight.device.type != "cpu":
            raise ValueError(f"Int8 layers run on the CPU; this layer's weight is on {linear.weight.device}.")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight_int8, layer.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _apply(self, fn, recurse=True):
        # the scales and the bias stay float32 when the model is cast (to bfloat16, say): they set the accuracy
        kept = {name: getattr(self, name) for name in ("weight_scale", "bias") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, tensor.to(getattr(self, name).device))
        self._packed = None  # moved or cast: pack again from the buffers
        return self

    def __getstate__(self):  # copies and pickles of the module repack instead of copying an opaque tensor
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            "Int8 CPU layers are made from a float model at load time and are not saved: save the float32 model "
            "and call `quantize_for_cpu` again after loading it."
        )

    def _backend_weight(self) -> tuple:
        backend = int8_backend()
        if self._packed is None or self._packed[0] != backend:
            if backend == "onednn":
                packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
                extra = (torch.ones(self.out_features), torch.zeros(self.out_features, dtype=torch.long))
                self._packed = (backend, packed, *extra)
            elif backend == "int_mm":
                self._packed = (backend, self.weight_int8.T.contiguous())
            else:
                self._packed = (backend, self.weight_int8.float())
        return self._packed

    def integer_product(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows @ Wq.T` for int8-valued float32 rows `[M, K]`, as float32 `[M, N]` (exact sums)."""
        backend, *weight = self._backend_weight()
        if backend == "onednn":
            return _onednn_product(rows, *weight)
        if backend == "int_mm":
            return _int_mm_product(rows, *weight)
        return rows @ weight[0].T

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu":
            raise ValueError(f"Int8 layers run on the CPU; got an input on {hidden_states.device}.")
        if hidden_states.requires_grad:
            raise RuntimeError(
                "Int8 CPU layers are for inference and have no backward pass: run under `torch.no_grad()` (or "
                "`torch.inference_mode()`), or train the float model."
            )
        shape = hidden_states.shape
        rows, row_scale = quantize_rows(hidden_states.reshape(-1, shape[-1]).float())
        output = self.integer_product(rows).mul_(row_scale).mul_(self.weight_scale.float())
        if self.bias is not None:
            output.add_(self.bias.float())
        return output.view(*shape[:-1], self.out_features).to(hidden_states.dtype)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def quantize_for_cpu(
    model: nn.Module,
    weights: str = "int8",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Replace the plain `nn.Linear` layers of a CPU model by :class:`Int8DynamicLinear`, in place, for inference.

    Args:
        model: any module on the CPU (a `CompoDiffTransformer`, a CLIP text or vision tower, ...).
        weights: the weight format; `"int8"` (the only one that is faster than float32 on the CPUs measured).
        include: module-name patterns (`fnmatch`, e.g. `"blocks.*.ff.*"`) of the layers to quantise; default: all.
        exclude: patterns of layers kept in float32, added to the model class's `_keep_float32_on_cpu_int8`
            (where accuracy needs float32; for `CompoDiffTransformer`, the layers run once per query).

    Returns:
        The names of the quantised layers.

    Raises `ValueError` for a model with weights off the CPU. Layers wrapped by adapters (PEFT) or hooks are left
    as they are; already quantised layers are skipped. Quantise after loading, and keep the float model for saving.

    Example:
        >>> import torch
        >>> from diffusers_cir import quantize_for_cpu
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        >>> x = torch.randn(4, 64)
        >>> reference = model(x)
        >>> quantize_for_cpu(model)
        ['0', '2']
        >>> with torch.no_grad():
        ...     bool(torch.nn.functional.cosine_similarity(model(x), reference).min() > 0.999)
        True
    """
    check_choice(weights, "weights", WEIGHT_FORMATS)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices - {"cpu", "meta"}:
        raise ValueError(
            f"`quantize_for_cpu` needs a model on the CPU; this one has weights on {sorted(devices)}. "
            "Call `model.to('cpu')` first (int8 layers run on the CPU only)."
        )
    keep = list(getattr(model, "_keep_float32_on_cpu_int8", ())) + list(exclude or ())
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and (include is None or _matches(name, include))
        and not _matches(name, keep)
        and not (module._forward_hooks or module._forward_pre_hooks or "_hf_hook" in module.__dict__)
    ]
    for name, module in chosen:
        if module.weight.device.type == "meta":
            raise ValueError(f"Layer {name!r} has no weights (meta device): load the model before quantising it.")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8DynamicLinear.from_linear(module))
    return [name for name, _ in chosen]


def cosine_to(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two `[..., D]` outputs, in float32 (what the benchmarks report)."""
    return F.cosine_similarity(output.float().flatten(0, -2), reference.float().flatten(0, -2), dim=-1)
