"""An independent PyTorch reference for PLaMo-2, reading the Hugging Face layout.

transformers has no PLaMo-2, and running a checkpoint's own modeling code means
executing downloaded Python (only with ``--trust-remote-code``). This module is
the default reference instead. It shares no code with the MLX model
(:mod:`hybridconv.models.plamo2`) on purpose: it is written the plain way —
the Mamba recurrence as a loop over time steps, attention with an explicit
mask — so that a mistake in the MLX model's vectorised SSD scan, its caches or
its weight layout cannot be repeated here. It reads PyTorch tensor layouts
(conv1d ``[C, 1, K]``) straight from the source checkpoint.

Semantics follow the model's authors (Preferred Networks' MLX port of their
modeling code, ml-explore/mlx-examples commit fb1559e1, the oracle of the
fixture ``hybrids/plamo2-window-tiny``): ``dt = softplus(·)`` with no clip; a
windowed attention layer lets a query see itself and the
``attention_window_size`` positions before it; the B, C and dt norms have no
offset; the QK norms use eps 1e-6. (mlx-lm clips ``dt`` to ``[1e-3, 100]`` and
applies no window; the older fixtures stay clear of both.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def _schedule(cfg: dict) -> list[bool]:
    """True where the layer is Mamba."""
    n = cfg["num_hidden_layers"]
    step = cfg.get("mamba_step", 2)
    if not cfg.get("mamba_enabled", True):
        return [False] * n
    if n <= step // 2:
        return [i != n - 1 for i in range(n)]
    return [i % step != step // 2 for i in range(n)]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class TorchPlamo2:
    """``TorchPlamo2(folder)(ids[B, T]) -> logits[B, T, V]``; block outputs via ``hidden``.

    With ``stream=True`` nothing is read at construction: :meth:`load_globals`
    reads the embedding, final norm and head, :meth:`load_layer` /
    :meth:`release_layer` one layer's weights (verify's streamed reference,
    :class:`hybridconv.verify.torch_stream.Plamo2Blocks`); :meth:`embed`,
    :meth:`layer` and :meth:`head` are the pieces ``__call__`` composes."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, stream: bool = False, index=None):
        from ..checkpoint import index_weights

        folder = Path(folder)
        self.cfg = cfg = json.loads((folder / "config.json").read_text())
        self.dtype = dtype
        self.index = index or index_weights(folder)
        self.w: dict[str, torch.Tensor] = {}
        self.mamba = _schedule(cfg)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.n_layers = cfg["num_hidden_layers"]
        if not stream:
            self._read(list(self.index.tensors))

    def _read(self, names) -> None:
        from .torch_stream import read_source_tensor

        for name in names:
            self.w[name] = read_source_tensor(self.index.tensors[name]).to(self.dtype)

    def _layer_names(self, i: int) -> list[str]:
        head = f"model.layers.layers.{i}."
        return [n for n in self.index.tensors if n.startswith(head)]

    def block_bytes(self) -> dict:
        """Source bytes per layer (None: embedding, final norm, head)."""
        out: dict = {None: 0}
        for n, t in self.index.tensors.items():
            g = int(n.split(".")[3]) if n.startswith("model.layers.layers.") else None
            out[g] = out.get(g, 0) + t.nbytes
        return out

    def load_globals(self) -> None:
        self._read([n for n in self.index.tensors if not n.startswith("model.layers.layers.")])

    def load_layer(self, i: int) -> None:
        self._read(self._layer_names(i))

    def release_layer(self, i: int) -> None:
        for name in self._layer_names(i):
            self.w.pop(name, None)

    def _p(self, name: str) -> torch.Tensor:
        return self.w[name]

    def _norm(self, x, name, offset):
        return _rms(x.float(), self.eps).to(self.dtype) * (self._p(name) + offset)

    # -- Mamba -----------------------------------------------------------------------
    def _mamba(self, x: torch.Tensor, p: str) -> torch.Tensor:
        cfg = self.cfg
        b, T, _ = x.shape
        H, P, N = cfg["mamba_num_heads"], cfg["hidden_size_per_head"], cfg["mamba_d_state"]
        K = cfg.get("mamba_d_conv", 4)
        zx = F.linear(x, self._p(p + "in_proj.weight")).view(b, T, H, 2 * P)
        z, u = zx[..., :P].reshape(b, T, H * P), zx[..., P:].reshape(b, T, H * P)
        conv_w = self._p(p + "conv1d.weight")  # PyTorch layout [C, 1, K]
        u = F.conv1d(u.transpose(1, 2), conv_w, padding=K - 1, groups=H * P)[..., :T]
        u = F.silu(u.transpose(1, 2))
        bcdt = F.linear(u, self._p(p + "bcdt_proj.weight"))
        Bm, Cm, dt = bcdt[..., :N], bcdt[..., N : 2 * N], bcdt[..., 2 * N :]
        Bm = _rms(Bm, self.eps) * self._p(p + "B_norm_weight")
        Cm = _rms(Cm, self.eps) * self._p(p + "C_norm_weight")
        dt = _rms(dt, self.eps) * self._p(p + "dt_norm_weight")
        dt = F.linear(dt, self._p(p + "dt_proj.weight")).float()
        dt = F.softplus(dt + self._p(p + "dt_bias").float())  # no clip
        A = -torch.exp(self._p(p + "A_log").float())
        D = self._p(p + "D").float()
        xs = u.view(b, T, H, P).float()
        Bm, Cm = Bm.float(), Cm.float()
        h = torch.zeros(b, H, P, N)
        ys = []
        for t in range(T):  # the recurrence, one step at a time
            decay = torch.exp(dt[:, t] * A)  # [b, H]
            h = decay[..., None, None] * h + (dt[:, t, :, None, None] * xs[:, t, :, :, None]) * Bm[:, t, None, None, :]
            ys.append(torch.einsum("bhpn,bn->bhp", h, Cm[:, t]) + D[:, None] * xs[:, t])
        y = torch.stack(ys, dim=1).reshape(b, T, H * P).to(self.dtype)
        return F.linear(F.silu(z) * y, self._p(p + "out_proj.weight"))

    # -- attention -------------------------------------------------------------------
    def _attention(self, x: torch.Tensor, p: str, layer: int) -> torch.Tensor:
        cfg = self.cfg
        b, T, _ = x.shape
        hq, hk, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size_per_head"]
        qkv = F.linear(x, self._p(p + "qkv_proj.weight"))
        q = qkv[..., : hq * d].view(b, T, hq, d).transpose(1, 2)
        k = qkv[..., hq * d : (hq + hk) * d].view(b, T, hk, d).transpose(1, 2)
        v = qkv[..., (hq + hk) * d :].view(b, T, hk, d).transpose(1, 2)
        q = _rms(q.float(), 1e-6).to(self.dtype) * self._p(p + "q_weight")[None, :, None, :]
        k = _rms(k.float(), 1e-6).to(self.dtype) * self._p(p + "k_weight")[None, :, None, :]
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(self.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(self.dtype)
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
        pos = torch.arange(T)
        allowed = pos[None, :] <= pos[:, None]
        if layer not in (cfg.get("full_attention_idx") or []):
            window = cfg.get("attention_window_size", 2048)
            allowed &= pos[None, :] >= pos[:, None] - window  # itself and `window` before it
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v.float()).to(self.dtype)
        return F.linear(out.transpose(1, 2).reshape(b, T, hq * d), self._p(p + "o_proj.weight"))

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        gate, up = F.linear(x, self._p(p + "gate_up_proj.weight")).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self._p(p + "down_proj.weight"))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._p("model.embed_tokens.weight")[ids.long()]

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.layers.{i}."
        h = self._norm(x, p + "pre_mixer_norm.weight", 1.0)
        h = self._mamba(h, p + "mixer.") if self.mamba[i] else self._attention(h, p + "mixer.", i)
        x = x + self._norm(h, p + "post_mixer_norm.weight", 1.0 / 5)
        h = self._mlp(self._norm(x, p + "pre_mlp_norm.weight", 1.0), p + "mlp.")
        return x + self._norm(h, p + "post_mlp_norm.weight", 1.0 / 5**1.5)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(x, "model.norm.weight", 1.0)
        head = self.w.get("lm_head.weight") if not self.cfg.get("tie_word_embeddings", True) else None
        return F.linear(x, head if head is not None else self._p("model.embed_tokens.weight"))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, hidden: list | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for i in range(self.n_layers):
            x = self.layer(i, x)
            if hidden is not None:
                hidden.append(x)
        return self.head(x)

    def block_kinds(self) -> list[str]:
        return ["mamba" if m else "attention" for m in self.mamba]
