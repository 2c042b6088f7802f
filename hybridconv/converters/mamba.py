"""Mamba (Mamba-1) converter: config normalisation, tensor rules, quantization
policy. Falcon-Mamba (:mod:`hybridconv.converters.falcon_mamba`) reuses all of
it.

Architecture and math: :mod:`hybridconv.models.mamba`.

Config layouts
--------------
transformers 4 and 5 write the same keys (``hidden_size``, ``intermediate_size``,
``state_size``, ``conv_kernel``, ``time_step_rank``, ``use_bias``,
``use_conv_bias``, ``layer_norm_epsilon``, ``tie_word_embeddings``);
``time_step_rank`` may be ``"auto"`` (``ceil(hidden_size / 16)``), and an
absent ``intermediate_size`` is ``expand · hidden_size``. The original
``mamba_ssm`` names (``d_model``, ``n_layer``, ``d_inner``, ``d_state``,
``d_conv``, ``bias``, ``conv_bias``) are accepted as aliases, as mlx-lm does.
The output config holds the resolved numbers under the transformers names,
which is what mlx-lm's ``mamba`` reads.

Tensor rules, in order:

* ``drop`` ``lm_head.weight`` when ``tie_word_embeddings`` is true (the head is
  ``backbone.embeddings.weight``).
* ``conv1d-to-mlx`` the mixer's depthwise conv kernels, PyTorch ``[I, 1, K]`` to
  MLX ``[I, K, 1]`` (``K = conv_kernel``).
* ``keep-float32`` ``A_log`` ``[I, N]``, ``D`` and ``dt_proj.bias``, stored as in
  the checkpoint (``A_log``, not ``A``), float32 whatever ``--dtype`` says. The
  state decays by ``exp(softplus(dt_proj(δ) + bias) · A)`` at every step: a
  bf16 rounding of ``A_log`` or of the bias (``log(expm1(Δ))``, around -4 to -7
  for the usual Δ in [1e-3, 0.1]; bf16 resolves 0.03 there, a 3 % error in Δ)
  compounds over the sequence. With the bias in float32 the ``dt_proj`` sum is
  formed in float32, as transformers does (``weight @ δ`` then ``+ bias.float()``).
* everything else: cast to ``--dtype``; names kept (transformers' and mlx-lm's).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_proj.bias`` (float32,
kept so by the conversion), the conv1d kernels and biases (``K`` taps per
channel) and every norm weight (these in the output dtype, as mlx-lm stores
them: README, "Quantization").

Quantized (:data:`ROLES`): ``in_proj``, ``x_proj`` (→ δ, B, C), ``dt_proj``
(``R → I``), ``out_proj`` at ``--bits``, and the embeddings / head (sensitive:
wider in the mixed recipes) — the layers mlx-lm quantizes. ``x_proj`` and
``dt_proj`` feed the recurrence (B, C and the time step), so keeping them in
float was measured rather than assumed: KL(reference ‖ 4-bit, group 32) from
``hybridconv verify``, quantized vs kept in float:

=========================  =========  ===============  ===============  ==================
case                       default    x_proj float     x_proj 8-bit     dt_proj float
=========================  =========  ===============  ===============  ==================
mamba-tiny                 1.450e-2   1.449e-2         1.449e-2         (rank 4: float)
falcon_mamba-tiny          1.809e-2   1.827e-2         1.823e-2         (rank 4: float)
mamba, rank 32 (unseen)    1.435e-2   1.434e-2         —                1.435e-2
=========================  =========  ===============  ===============  ==================

No gain (changes between -0.1 % and +1 %, noise) for +1.8 (x_proj) and +2.4
(dt_proj) bits per weight on these models: both are quantized like the other
projections, and neither is marked sensitive. Where the error does come from is
``in_proj`` (kept in float: 1.450e-2 → 0.940e-2 on mamba-tiny, at +11 bits per
weight); it is the largest matrix of the block, so it stays at ``--bits``.
``dt_proj`` has ``R = time_step_rank`` inputs (48 for Mamba-130M, 256 for
Falcon-Mamba-7B, 4 on the fixtures): when ``R`` is not a multiple of the group
size quantize keeps it in float and says so per tensor.
"""

from __future__ import annotations

import math

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import mamba as model_module
from ._common import head_rules
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rule

SSM_FLOAT32 = r"\.mixer\.(A_log|D|dt_proj\.bias)$"


def normalize_stack_options(raw: dict, cfg: dict, tie_default: bool, block: str) -> None:
    """The keys Mamba and Mamba-2 configs share besides the mixer's sizes."""
    cfg["use_bias"] = pick(raw, "use_bias", "bias", default=False, kind=bool)
    cfg["use_conv_bias"] = pick(raw, "use_conv_bias", "conv_bias", default=True, kind=bool)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=tie_default, kind=bool)
    cfg["layer_norm_epsilon"] = pick(raw, "layer_norm_epsilon", "rms_norm_eps", default=1e-5, kind=float)
    cfg["residual_in_fp32"] = pick(raw, "residual_in_fp32", default=True, kind=bool)
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: 'hidden_act' must be \"silu\" (the only activation of the {block} block), found {act!r}")


def normalize_config(raw: dict, model_type: str = "mamba") -> dict:
    cfg = dict(raw)
    cfg["model_type"] = model_type

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size", "d_model")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", "n_layer", "n_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["state_size"] = positive_int(raw, "state_size", "d_state", default=16)
    cfg["conv_kernel"] = positive_int(raw, "conv_kernel", "d_conv", default=4)
    expand = pick(raw, "expand", default=2, kind=int)
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size", "d_inner", default=expand * hidden)
    rank = pick(raw, "time_step_rank", "dt_rank", default="auto")
    if rank == "auto":
        rank = math.ceil(hidden / 16)
    elif isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"config.json: 'time_step_rank' must be an integer or \"auto\", found {rank!r}")
    cfg["time_step_rank"] = positive("time_step_rank", rank)
    normalize_stack_options(raw, cfg, tie_default=True, block="Mamba")
    if model_type == "falcon_mamba":
        cfg["mixer_rms_eps"] = pick(raw, "mixer_rms_eps", default=1e-6, kind=float)
        cfg["use_bcdt_rms"] = True
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg, "backbone.embeddings.weight", rotary=False)
    out.append(ConvToMLX(r"\.mixer\.conv1d\.weight$", cfg["conv_kernel"], "Mamba conv1d weights"))
    out.append(KeepFloat32(SSM_FLOAT32, "SSM dynamics: rounding compounds over every step", "A_log, D, dt_proj.bias"))
    return out


# Shared with Mamba-2 (same backbone, same names).
STACK_PROTECTED = (
    Protected(r"\.mixer\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm(_f)?\.weight$", "norm weights scale whole activations"),
)
STACK_ROLES = (
    Role("embed", r"^backbone\.embeddings\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
)
PROTECTED = (Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), Δ = softplus(dt_proj(δ) + bias)"),) + STACK_PROTECTED
ROLES = STACK_ROLES + (
    Role("mamba.in_proj", r"\.mixer\.in_proj\.weight$"),
    Role("mamba.x_proj", r"\.mixer\.x_proj\.weight$"),
    Role("mamba.dt_proj", r"\.mixer\.dt_proj\.weight$"),
    Role("mamba.out_proj", r"\.mixer\.out_proj\.weight$"),
)

ARCH = register(
    Architecture(
        model_type="mamba",
        architectures=("MambaForCausalLM",),
        title="Mamba (selective state spaces)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
