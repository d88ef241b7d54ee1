"""The adapter algorithms: LoRA, LoKr, LoHa and DoRA, each trained in bypass form.

Every adapter sits beside one frozen Linear or Conv2d (weight W, shape [out, in(, kh, kw)]) and
works on activations inside the network's forward hook: the layer computes `base(x)` as usual and
the adapter adds `strength * ΔW x` without ever building a full-size weight. The math is the one
ComfyUI 0.3.64's loader (`comfy/weight_adapter/`) applies to the saved file, so the model ComfyUI
patches from our file computes what we trained (tests compare both):

    lora  ΔW = (alpha/rank) · up @ down                         keys lora_up.weight, lora_down.weight
    loha  ΔW = (alpha/rank) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)      keys hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b
    lokr  ΔW = c · kron(W1, W2), W2 = w2_a @ w2_b (decomposed) or full
          c = alpha/rank once for the whole product when W2 is decomposed, c = 1 when both factors
          are stored in full (ComfyUI ignores alpha then)       keys lokr_w1, lokr_w2 | lokr_w2_a, lokr_w2_b
    dora  LoRA plus a learned magnitude m per INPUT channel     keys lora_up/lora_down + dora_scale [1, in(,1,1)]
          W' = (W + ΔW) · m / ‖W + ΔW‖_col   (column norm: per input channel, over outputs and kernel)
          at strength s ComfyUI computes W + s·(W' − W).

Layouts and why:
- LoKr: W1 [out1, in1] is the small factor, always stored in full; W2 [out2, in2(, kh, kw)] is the
  larger one, decomposed at rank r when `decompose` is on and r < min(out2, in2) (else stored in
  full, and alpha no longer applies — what ComfyUI does with such a file). Bypass: x viewed as
  [.., in1, in2] → W2 on the last axis (a conv with the layer's kernel for convs) → W1 across
  in1; cost ~ (in1·in2·out2 + in1·out1·out2) per token, no [out, in] matrix.
- LoHa: the Hadamard product of two rank-r products is a rank-r² product (face-splitting /
  Khatri-Rao of the factors), so the bypass is down = [r², in] then up = [out, r²]: exact, and
  smaller than a full weight while r² < in·out/(in+out). Costs r² where LoRA costs r.
- DoRA: ComfyUI reads `dora_scale` on the output axis when its first size equals `out` and then
  normalises by the ORIGINAL weight (W' = m/‖W‖_row · (W + ΔW): a plain per-output gain, not DoRA),
  and on the input axis it normalises by the MERGED weight (real DoRA, also what A1111 applies).
  We use the input axis [1, in(,1,1)], so ComfyUI and A1111 apply the file alike. In bypass form
  it rescales the layer's INPUT: with g = m / (‖W + ΔW‖_col + eps) and h = 1 + s·(g − 1),
      y = base(h ⊙ x) + s · ΔW (g ⊙ x)      (= (W + s(W' − W)) x + b exactly).
  The column norms need W once per forward: ‖W_col‖² is a constant (cached while the weight is
  unchanged), the cross term 2⟨W_col, ΔW_col⟩ = 2 Σ_k (upᵀW)[k, col]·down[k, col] needs upᵀW
  [rank, in] — computed in row chunks by a custom autograd function that keeps only a reference
  to W (already resident) and recomputes its chunks in backward, so no full-size copy is saved —
  and ‖ΔW_col‖² = downᵀ(upᵀup)down is small. eps is float32's, as ComfyUI patches in float32.
  With fp8 base weights the norms are computed from the fp8 weight dequantised chunk by chunk in
  float32 (the weight the layer really computes with), so training stays self-consistent; the
  file applied to the original full-precision model differs from training by fp8's rounding.
  In training fp8's own pre-hook runs first and hands each forward a fresh upcast copy, so
  ‖W_col‖² is then re-measured every forward (chunked, without autograd) instead of cached.
  Measured cost (bench/algorithms.py, BENCHMARKS.md): DoRA's step is the slowest of the four.

Why not peft: it injects its own layer classes in place of the model's Linears (changing the
shared ComfyUI model for every other node of the workflow), and its LoKr/LoHa/DoRA follow
LyCORIS/paper conventions (DoRA normalised per output row, LoKr alpha per factor) that differ from
what ComfyUI's loader computes. The formats and math here are small enough to own and test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, LoRALabError

ALGORITHMS = ("lora", "lokr", "loha", "dora")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_EPS = torch.finfo(torch.float32).eps  # what ComfyUI adds to the norm (it patches in float32)
_CHUNK_ROWS = 1024


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = small * large with small <= large: `factor` itself when it divides dim and
    factor² <= dim, else the largest divisor not above sqrt(dim) (and not above factor if given)."""
    if factor > 0 and dim % factor == 0 and factor * factor <= dim:
        return factor, dim // factor
    limit = math.isqrt(dim) if factor <= 0 else min(math.isqrt(dim), factor)
    small = max(d for d in range(1, limit + 1) if dim % d == 0)
    return small, dim // small


class _Layer:
    """Shape facts of the adapted layer and the two ops every adapter is built from."""

    def __init__(self, base: nn.Module):
        if isinstance(base, nn.Linear):
            self.conv = None
            self.in_dim, self.out_dim, self.kernel = base.in_features, base.out_features, ()
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise LoRALabError(f"cannot adapt a grouped Conv2d (groups={base.groups}); only plain convs take an adapter.")
            self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            self.in_dim, self.out_dim, self.kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)
        else:
            raise LoRALabError(f"cannot adapt a {type(base).__name__}: only Linear and Conv2d layers take an adapter.")
        self.k = math.prod(self.kernel)

    def first(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x through w [r, in*k] with the layer's own kernel, stride and padding."""
        if self.conv is None:
            return F.linear(x, w)
        return F.conv2d(x, w.reshape(w.shape[0], -1, *self.kernel), **self.conv)

    def pointwise(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h through w [out, r] on the feature / channel axis."""
        if self.conv is None:
            return F.linear(h, w)
        return F.conv2d(h, w[:, :, None, None])


class Adapter(nn.Module):
    """Common part: shape, alpha, dropout, dtype handling. Subclasses define delta(x) and the file keys."""

    algorithm = ""
    scales_input = False  # DoRA: the network also installs a pre-hook that calls input_gain()

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.layer = _Layer(base)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return self.dropout(x)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """What the adapter adds to the layer's output for input x."""
        return self.delta(self._input(x)) * (self.scale * strength)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the layer's weight shape, scale included (closed form, for tests and checks)."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The weight ComfyUI computes from this adapter's file at `strength` (closed form)."""
        return weight.float() + strength * self.delta_weight()

    def _shape(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.layer.out_dim, self.layer.in_dim, *self.layer.kernel)

    # file keys: suffix -> tensor; the network prefixes the module name
    def to_file(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_file(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        own = self.to_file()
        missing = [k for k in own if k not in parts and k != "alpha"]
        if missing:
            found = ", ".join(sorted(k for k in parts if k != "alpha")) or "nothing"
            raise LoRALabError(
                f"{name}: the saved LoRA has {found} where this {self.algorithm} network needs {', '.join(sorted(own))}; "
                "set the Network node's algorithm (and lokr options) to the ones the LoRA was trained with."
            )
        for key, dst in self._file_params().items():
            src = parts[key]
            if src.numel() != dst.numel():
                raise LoRALabError(
                    f"{name}: saved {key} has shape {tuple(src.shape)}, this network expects {tuple(dst.shape)}; "
                    "set rank (and conv_rank, lokr_factor) to the values the LoRA was trained with."
                )
            with torch.no_grad():
                dst.copy_(src.reshape(dst.shape).to(dst.dtype))
        if "alpha" in parts:
            self.alpha.fill_(float(parts["alpha"]))

    def _file_params(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LoRAModule(Adapter):
    """y += (alpha/rank) · up(down(x)); down has the layer's kernel, up is 1x1."""

    algorithm = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        L = self.layer
        if rank > min(L.in_dim, L.out_dim):
            raise ConfigError("rank", f"{rank} is larger than a target layer's width ({L.in_dim}->{L.out_dim}); use rank <= {min(L.in_dim, L.out_dim)}.")
        if L.conv is None:
            self.down = nn.Linear(L.in_dim, rank, bias=False)
            self.up = nn.Linear(rank, L.out_dim, bias=False)
        else:
            self.down = nn.Conv2d(L.in_dim, rank, L.kernel, bias=False, **L.conv)
            self.up = nn.Conv2d(rank, L.out_dim, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def delta(self, x):
        return self.up(self.down(x))

    def _up(self) -> torch.Tensor:
        return self.up.weight.reshape(self.layer.out_dim, self.rank)

    def _down(self) -> torch.Tensor:
        return self.down.weight.reshape(self.rank, -1)

    def delta_weight(self):
        return self._shape(self._up().float() @ self._down().float()) * self.scale

    def _file_params(self):
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}

    def to_file(self):
        return {**self._file_params(), "alpha": self.alpha}


class DoRAModule(LoRAModule):
    """LoRA plus a magnitude per input channel, normalised by the merged weight's column norm."""

    algorithm = "dora"
    scales_input = True

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        with torch.no_grad():
            weight, fp8_scale = _stored_weight(base)
            self.magnitude = nn.Parameter(_column_norm_sq(weight, fp8_scale, self.layer).sqrt())
        self._norm_cache: tuple | None = None

    def _weight_norm_sq(self, weight, fp8_scale) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, _column_norm_sq(weight, fp8_scale, self.layer))
        return self._norm_cache[1]

    def input_gain(self, base: nn.Module) -> torch.Tensor:
        """g = m / (‖W + ΔW‖_col + eps), one value per input channel (float32)."""
        weight, fp8_scale = _stored_weight(base)
        L, s = self.layer, self.scale
        up, down = self._up().float(), self._down().float().reshape(self.rank, L.in_dim, L.k)
        utw = _ProjectOnto.apply(up, weight, fp8_scale, L.in_dim, L.k)  # [rank, in, k]
        cross = (utw * down).sum(dim=(0, 2))
        delta_sq = torch.einsum("aik,ab,bik->i", down, up.t() @ up, down)
        norm_sq = self._weight_norm_sq(weight, fp8_scale) + 2 * s * cross + s * s * delta_sq
        return self.magnitude / (norm_sq.clamp_min(1e-30).sqrt() + _EPS)

    def gain_view(self, gain: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gain.view(-1, 1, 1) if self.layer.conv is not None else gain

    def forward_scaled(self, x: torch.Tensor, gain: torch.Tensor, strength: float) -> torch.Tensor:
        """s · ΔW (g ⊙ x): the adapter's part of the output for the layer's ORIGINAL input x."""
        x = self._input(x)
        return self.delta(x * self.gain_view(gain, x).to(x.dtype)) * (self.scale * strength)

    def merged_weight(self, weight, strength=1.0):
        w = weight.float()
        merged = w + self.delta_weight()
        dims = [0] + list(range(2, merged.dim()))
        norm = merged.pow(2).sum(dim=dims, keepdim=True).sqrt() + _EPS
        full = merged * (self.magnitude.float().reshape(norm.shape) / norm)
        return w + strength * (full - w)

    def _file_params(self):
        return {**super()._file_params(), "dora_scale": self.magnitude}

    def to_file(self):
        out = super().to_file()
        out["dora_scale"] = self.magnitude.reshape(1, self.layer.in_dim, *([1] * len(self.layer.kernel)))
        return out


class LoHaModule(Adapter):
    """ΔW = (alpha/rank) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), applied as a rank-r² product."""

    algorithm = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        L = self.layer
        if rank * rank > L.in_dim * L.k * L.out_dim:
            raise ConfigError("rank", f"{rank} is too large for a {L.in_dim}->{L.out_dim} layer with LoHa; use a smaller rank.")
        self.w1_a = nn.Parameter(torch.randn(L.out_dim, rank) * 0.1)
        self.w1_b = nn.Parameter(torch.randn(rank, L.in_dim * L.k))
        self.w2_a = nn.Parameter(torch.zeros(L.out_dim, rank))  # zero: the adapter starts as a no-op
        self.w2_b = nn.Parameter(torch.randn(rank, L.in_dim * L.k))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        r2 = self.rank * self.rank
        down = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).reshape(r2, -1)
        up = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).reshape(self.layer.out_dim, r2)
        return up, down

    def delta(self, x):
        up, down = self._factors()  # x is already in the factors' dtype (or autocast casts)
        return self.layer.pointwise(self.layer.first(x, down), up)

    def delta_weight(self):
        m1, m2 = self.w1_a.float() @ self.w1_b.float(), self.w2_a.float() @ self.w2_b.float()
        return self._shape(m1 * m2) * self.scale

    def _file_params(self):
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}

    def to_file(self):
        return {**self._file_params(), "alpha": self.alpha}


class LoKrModule(Adapter):
    """ΔW = c · kron(W1, W2); W1 small and full, W2 = w2_a @ w2_b at rank r or full."""

    algorithm = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, factor: int = -1, decompose: bool = True):
        super().__init__(base, rank, alpha, dropout)
        L = self.layer
        self.out1, self.out2 = factorization(L.out_dim, factor)
        self.in1, self.in2 = factorization(L.in_dim, factor)
        self.decomposed = decompose and rank < min(self.out2, self.in2 * L.k)
        self.w1 = nn.Parameter(torch.empty(self.out1, self.in1))
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        if self.decomposed:
            self.w2_a = nn.Parameter(torch.empty(self.out2, rank))
            nn.init.kaiming_uniform_(self.w2_a, a=math.sqrt(5))
            self.w2_b = nn.Parameter(torch.zeros(rank, self.in2 * L.k))  # zero: a no-op at step 0
        else:
            self.w2 = nn.Parameter(torch.zeros(self.out2, self.in2 * L.k))

    @property
    def scale(self) -> float:
        # ComfyUI divides alpha by the rank once, for the whole product, and only when a factor is decomposed.
        return float(self.alpha) / self.rank if self.decomposed else 1.0

    def delta(self, x):
        L = self.layer
        if L.conv is None:  # x [.., in1*in2] -> [.., in1, in2] -> W2 on in2 -> W1 across in1
            h = x.reshape(*x.shape[:-1], self.in1, self.in2)
            h = L.pointwise(L.first(h, self.w2_b), self.w2_a) if self.decomposed else L.first(h, self.w2)
            return torch.matmul(self.w1.to(h.dtype), h).reshape(*x.shape[:-1], L.out_dim)
        b = x.shape[0]  # channel groups of in2 go through W2 as a conv with the layer's kernel
        h = x.reshape(b * self.in1, self.in2, *x.shape[2:])
        h = L.pointwise(L.first(h, self.w2_b), self.w2_a) if self.decomposed else L.first(h, self.w2)
        spatial = h.shape[2:]
        h = h.reshape(b, self.in1, -1)  # [b, in1, out2*H*W]
        return torch.matmul(self.w1.to(h.dtype), h).reshape(b, L.out_dim, *spatial)

    def _w2(self) -> torch.Tensor:
        return self.w2_a.float() @ self.w2_b.float() if self.decomposed else self.w2.float()

    def delta_weight(self):
        return self._shape(torch.kron(self.w1.float(), self._w2())) * self.scale

    def _file_params(self):
        if self.decomposed:
            return {"lokr_w1": self.w1, "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b}
        return {"lokr_w1": self.w1, "lokr_w2": self.w2}

    def to_file(self):
        out = {**self._file_params(), "alpha": self.alpha}
        if not self.decomposed and self.layer.conv is not None:
            out["lokr_w2"] = self.w2.reshape(self.out2, self.in2, *self.layer.kernel)  # LyCORIS' conv layout
        return out


def make_adapter(algorithm: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, lokr_factor: int = -1, lokr_decompose: bool = True) -> Adapter:
    if algorithm == "lora":
        return LoRAModule(base, rank, alpha, dropout)
    if algorithm == "dora":
        return DoRAModule(base, rank, alpha, dropout)
    if algorithm == "loha":
        return LoHaModule(base, rank, alpha, dropout)
    if algorithm == "lokr":
        return LoKrModule(base, rank, alpha, dropout, lokr_factor, lokr_decompose)
    raise ConfigError("algorithm", f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")


# ---------------------------------------------------------------------------------------------
# DoRA's norms without a full-size copy of W


def _stored_weight(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight as stored, and its fp8 scale when it is stored in fp8 (trainer.precision)."""
    w = base.weight
    if w.dtype in FP8_DTYPES:
        return w, getattr(base, "weight_fp8_scale", None)
    return w, None


def _rows(weight: torch.Tensor, fp8_scale, start: int, stop: int) -> torch.Tensor:
    w = weight.detach()[start:stop].reshape(stop - start, -1).float()
    return w * fp8_scale.float() if fp8_scale is not None else w


def _column_norm_sq(weight: torch.Tensor, fp8_scale, layer: _Layer) -> torch.Tensor:
    """‖W_col‖² per input channel, float32, built row chunk by row chunk."""
    total = torch.zeros(layer.in_dim, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = _rows(weight, fp8_scale, start, min(start + _CHUNK_ROWS, weight.shape[0]))
        total += rows.pow(2).reshape(rows.shape[0], layer.in_dim, layer.k).sum(dim=(0, 2))
    return total


class _ProjectOnto(torch.autograd.Function):
    """upᵀ W as [rank, in, k] in float32; saves only a reference to W and recomputes in backward."""

    @staticmethod
    def forward(ctx, up, weight, fp8_scale, in_dim, k):
        ctx.save_for_backward(weight, fp8_scale) if fp8_scale is not None else ctx.save_for_backward(weight)
        ctx.has_scale = fp8_scale is not None
        out = torch.zeros(up.shape[1], weight[0].numel(), device=up.device)
        for start in range(0, weight.shape[0], _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, weight.shape[0])
            out += up[start:stop].t() @ _rows(weight, fp8_scale, start, stop)
        return out.reshape(up.shape[1], in_dim, k)

    @staticmethod
    def backward(ctx, grad):
        weight, fp8_scale = ctx.saved_tensors if ctx.has_scale else (ctx.saved_tensors[0], None)
        g = grad.reshape(grad.shape[0], -1)
        parts = [_rows(weight, fp8_scale, s, min(s + _CHUNK_ROWS, weight.shape[0])) @ g.t() for s in range(0, weight.shape[0], _CHUNK_ROWS)]
        return torch.cat(parts), None, None, None, None
