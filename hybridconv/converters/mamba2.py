"""Mamba-2 converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.mamba2` (SSD core:
:mod:`hybridconv.models.ssm`).

Config layouts
--------------
Both transformers 4 and 5 write ``num_heads``, ``head_dim``, ``expand``,
``n_groups``, ``state_size``, ``conv_kernel``, ``chunk_size``,
``time_step_rank`` (possibly ``"auto"``) and ``time_step_limit`` — and neither
writes ``intermediate_size`` (transformers derives it as
``expand · hidden_size``). transformers 5 serialises the default
``time_step_limit`` ``(0, inf)`` as ``[0.0, {"__float__": "Infinity"}]``;
transformers 4 (and the published Mamba-Codestral config) as
``[0.0, Infinity]``. Normalised: ``intermediate_size = num_heads · head_dim``
(checked equal to ``expand · hidden_size``, as transformers requires),
``time_step_rank`` an integer, ``time_step_limit`` a pair of numbers (written
``[0.0, Infinity]``, which Python's and mlx-lm's JSON readers accept),
``num_heads`` a multiple of ``n_groups``. mlx-lm's ``mamba2`` then reads the
output (it needs ``intermediate_size`` and a numeric ``time_step_limit``;
given the transformers-5 config as is, it fails).

Tensor rules, in order:

* ``drop`` ``lm_head.weight`` when ``tie_word_embeddings`` is true.
* ``conv1d-to-mlx`` the conv kernels over ``xBC``, PyTorch ``[C, 1, K]`` to MLX
  ``[C, K, 1]`` (``C = H·P + 2·G·N``, ``K = conv_kernel``).
* ``keep-float32`` ``A_log``, ``D``, ``dt_bias`` (``[H]`` each), stored as in the
  checkpoint: ``Δ = softplus(dt + dt_bias)`` and the decay ``exp(Δ·A)``
  compound every rounding over the sequence.
* everything else cast to ``--dtype``; names kept (transformers' = mlx-lm's).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_bias`` (float32, kept
so by the conversion), the conv1d kernels and biases, every norm weight (block
norms, ``norm_f``, the gated norm inside the mixer; these in the output dtype, as
mlx-lm stores them: README, "Quantization"). Quantized (:data:`ROLES`): ``in_proj`` (which also
produces ``dt``, B and C: Mamba-2 has no separate ``x_proj`` / ``dt_proj``),
``out_proj``, the embeddings and ``lm_head`` (sensitive), the layers mlx-lm
quantizes. Measured on ``mamba2-tiny`` (KL(reference ‖ 4-bit, group 32) from
``hybridconv verify``): 3.37e-2 quantized as above; ``in_proj`` kept in float
1.83e-2 (+11 bits per weight), ``out_proj`` kept in float 2.69e-2 (+4.8). The
error comes mostly from ``in_proj``, the largest matrix; it stays at
``--bits`` (``--keep mamba.in_proj`` or ``--bits-for mamba.in_proj=8`` trade
size for it).
"""

from __future__ import annotations

import math

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import mamba2 as model_module
from ._common import head_rules
from .mamba import STACK_PROTECTED, STACK_ROLES, normalize_stack_options
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rule

SSM_FLOAT32 = r"\.mixer\.(A_log|D|dt_bias)$"


def _number(value, where: str) -> float:
    """A JSON number, ``Infinity`` or transformers 5's ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
        value = value["__float__"]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"config.json: '{where}' must be a number, found {value!r}")
    return float(value)


def time_step_limit(raw: dict) -> list[float]:
    value = raw.get("time_step_limit")
    if value is None:
        return [0.0, math.inf]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"config.json: 'time_step_limit' must be a pair [min, max], found {value!r}")
    lo, hi = (_number(v, "time_step_limit") for v in value)
    if not (0.0 <= lo < hi) or math.isinf(lo):
        raise ConfigError(
            f"config.json: 'time_step_limit' must satisfy 0 <= min < max, found [{lo}, {hi}]"
        )
    return [lo, hi]


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "mamba2"

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size", "d_model")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", "n_layer", "n_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    heads = cfg["num_heads"] = positive_int(raw, "num_heads", default=128)
    head_dim = cfg["head_dim"] = positive_int(raw, "head_dim", "headdim", default=64)
    groups = cfg["n_groups"] = positive_int(raw, "n_groups", "ngroups", default=8)
    cfg["state_size"] = positive_int(raw, "state_size", "d_state", default=128)
    cfg["conv_kernel"] = positive_int(raw, "conv_kernel", "d_conv", default=4)
    cfg["chunk_size"] = positive_int(raw, "chunk_size", default=256)
    expand = positive_int(raw, "expand", default=2)
    inner = heads * head_dim
    stated = pick(raw, "intermediate_size", "d_inner", default=None, kind=int)
    if inner != expand * hidden or (stated is not None and stated != inner):
        raise ConfigError(
            f"config.json: num_heads · head_dim = {heads}·{head_dim} = {inner} must equal expand · hidden_size "
            f"= {expand}·{hidden} = {expand * hidden}"
            + (f" and intermediate_size ({stated})" if stated is not None else ""),
            "transformers' Mamba2 requires it; the config does not describe a consistent model",
        )
    cfg["intermediate_size"] = inner
    if heads % groups:
        raise ConfigError(f"config.json: num_heads ({heads}) is not a multiple of n_groups ({groups})")
    rank = pick(raw, "time_step_rank", default="auto")
    if rank == "auto":
        rank = math.ceil(hidden / 16)
    elif isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"config.json: 'time_step_rank' must be an integer or \"auto\", found {rank!r}")
    cfg["time_step_rank"] = rank
    cfg["time_step_limit"] = time_step_limit(raw)
    normalize_stack_options(raw, cfg, tie_default=False, block="Mamba-2")
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg, "backbone.embeddings.weight", rotary=False)
    out.append(ConvToMLX(r"\.mixer\.conv1d\.weight$", cfg["conv_kernel"], "Mamba-2 conv1d weights"))
    out.append(KeepFloat32(SSM_FLOAT32, "SSM dynamics: rounding compounds over every step", "A_log, D, dt_bias"))
    return out


PROTECTED = (Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), Δ = softplus(dt + dt_bias)"),) + STACK_PROTECTED
ROLES = STACK_ROLES + (
    Role("mamba.in_proj", r"\.mixer\.in_proj\.weight$"),
    Role("mamba.out_proj", r"\.mixer\.out_proj\.weight$"),
)

ARCH = register(
    Architecture(
        model_type="mamba2",
        architectures=("Mamba2ForCausalLM",),
        title="Mamba-2 (SSD)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
