"""PLaMo-2 converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.plamo2`.

Tensor rules, in order:

* ``drop`` ``rotary_emb.inv_freq`` buffers (recomputed from ``rope_theta``) and,
  when ``tie_word_embeddings`` is true, ``lm_head.weight`` (the head is the
  embedding matrix).
* ``conv1d-to-mlx`` the Mamba conv kernels, PyTorch ``[C, 1, K]`` to MLX
  ``[C, K, 1]`` with ``K = mamba_d_conv`` from the config.
* ``keep-float32`` ``A_log``, ``D`` and ``dt_bias``, stored as in the checkpoint
  (``A_log``, not ``A``) and in float32 whatever ``--dtype`` says. At run time
  ``A = -exp(A_log)``, ``dt = softplus(dt_proj(dt) + dt_bias)`` and the state
  decays by ``exp(dt·A)`` at every step: a bf16 rounding of ``A_log`` (about
  0.4 % relative) becomes an error in the decay rate that compounds over the
  whole sequence. They are a few hundred numbers per layer.
* everything else: cast to ``--dtype``; names are kept (mlx-lm uses the Hugging
  Face names, ``model.layers.layers.N...``).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_bias`` (the SSM
dynamics, float32 whatever ``--dtype`` says: they are kept float32 by the
conversion), the conv1d kernels (4 taps per channel: a 4-bit grid over 4 numbers
is no approximation) and every norm weight (the four per layer, the final norm,
the B/C/dt norms and the per-head QK-norm weights: they scale whole activation
vectors), these two in the output dtype (bf16 for a bf16 output, as mlx-lm
stores them; float32 copies cost +0.18 bits per weight on the tiny fixture, KL
within bf16 noise either way: README, "Quantization"). Together they are under
0.2 % of the parameters of PLaMo-2 1B.

Quantized (:data:`ROLES`): every projection matrix and the embeddings, at
``--bits`` by default — the same layers mlx-lm quantizes. Measured on the
fixtures (``scripts/compare_quant.py`` and README, "Quantization"): keeping
``dt_proj`` (``dt_dim → heads``; it feeds ``softplus`` into ``exp(dt·A)``) in
float gave no measurable KL gain (4-bit: 0.0139 vs 0.0138) for +0.07 bits per
weight on the tiny model, so it is quantized like the rest; ``bcdt_proj`` (B, C
and dt, the inputs of the recurrence) at 8 bits cut the 4-bit KL by 9 % but
costs +0.28 bits per weight on the tiny fixture (about +0.04 on PLaMo-2 1B by
parameter share), so it is marked *sensitive* — wider in the mixed recipes
(``mixed-4-6``: 6 bits) — rather than wider by default. Also sensitive: the
embeddings / head and the MLP ``down_proj`` (the largest outliers, as in
transformer quantization practice).
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import plamo2 as model_module
from ._common import head_rules
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rule

SSM_FLOAT32 = r"\.mixer\.(A_log|D|dt_bias)$"


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "plamo2"

    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads")
    cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=4)
    cfg["hidden_size_per_head"] = positive_int(raw, "hidden_size_per_head", "head_dim")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    cfg["mamba_num_heads"] = positive_int(raw, "mamba_num_heads")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state")
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    cfg["mamba_step"] = pick(raw, "mamba_step", default=2, kind=int)
    cfg["mamba_chunk_size"] = positive_int(raw, "mamba_chunk_size", default=256)
    cfg["mamba_enabled"] = pick(raw, "mamba_enabled", default=True, kind=bool)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=2048, kind=int)
    cfg["attention_window_size"] = positive_int(raw, "attention_window_size", "sliding_window", default=2048)
    cfg["rope_theta"] = pick(
        raw, "rope_theta", "rope_parameters.rope_theta", default=10000.0, kind=float
    )
    full = pick(raw, "full_attention_idx", default=[], kind=list)
    n = cfg["num_hidden_layers"]
    for i in full:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ConfigError(
                f"config.json: full_attention_idx entry {i!r} is not a layer index 0..{n - 1}"
            )
    cfg["full_attention_idx"] = sorted(set(full))
    if cfg["mamba_enabled"] and cfg["mamba_step"] < 2:
        raise ConfigError(
            f"config.json: mamba_step must be at least 2 (found {cfg['mamba_step']}): "
            "layer i is attention when i % mamba_step == mamba_step // 2"
        )
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ConfigError(
            f"config.json: num_attention_heads ({cfg['num_attention_heads']}) is not a multiple "
            f"of num_key_value_heads ({cfg['num_key_value_heads']})"
        )
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg)
    out.append(ConvToMLX(r"\.mixer\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba conv1d weights"))
    out.append(
        KeepFloat32(SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_bias")
    )
    return out


PROTECTED = (
    Protected(r"\.mixer\.(A_log|D|dt_bias)$", "SSM dynamics: A = -exp(A_log), dt = softplus(. + dt_bias)"),
    Protected(r"\.mixer\.conv1d\.weight$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"(norm\.weight|norm_weight|\.q_weight|\.k_weight)$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mixer\.in_proj\.weight$"),
    Role("mamba.bcdt_proj", r"\.mixer\.bcdt_proj\.weight$", sensitive=True),
    Role("mamba.dt_proj", r"\.mixer\.dt_proj\.weight$"),
    Role("mamba.out_proj", r"\.mixer\.out_proj\.weight$"),
    Role("attn.qkv_proj", r"\.mixer\.qkv_proj\.weight$"),
    Role("attn.o_proj", r"\.mixer\.o_proj\.weight$"),
    Role("mlp.gate_up_proj", r"\.mlp\.gate_up_proj\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="plamo2",
        architectures=("Plamo2ForCausalLM",),
        title="PLaMo-2 (Mamba-2 + attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
