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
"""

from __future__ import annotations

from ..config import pick, positive
from ..errors import ConfigError
from ..models import plamo2 as model_module
from .registry import Architecture, register
from .rules import ConvToMLX, Drop, KeepFloat32, Rule

SSM_FLOAT32 = r"\.mixer\.(A_log|D|dt_bias)$"


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "plamo2"

    def req_int(*names):
        return positive(names[0], pick(raw, *names, kind=int))

    cfg["hidden_size"] = req_int("hidden_size")
    cfg["num_hidden_layers"] = req_int("num_hidden_layers")
    cfg["vocab_size"] = req_int("vocab_size")
    cfg["num_attention_heads"] = req_int("num_attention_heads")
    cfg["num_key_value_heads"] = positive(
        "num_key_value_heads", pick(raw, "num_key_value_heads", default=4, kind=int)
    )
    cfg["hidden_size_per_head"] = req_int("hidden_size_per_head", "head_dim")
    cfg["intermediate_size"] = req_int("intermediate_size")
    cfg["mamba_num_heads"] = req_int("mamba_num_heads")
    cfg["mamba_d_state"] = req_int("mamba_d_state")
    cfg["mamba_d_conv"] = positive("mamba_d_conv", pick(raw, "mamba_d_conv", default=4, kind=int))
    cfg["mamba_step"] = pick(raw, "mamba_step", default=2, kind=int)
    cfg["mamba_chunk_size"] = positive(
        "mamba_chunk_size", pick(raw, "mamba_chunk_size", default=256, kind=int)
    )
    cfg["mamba_enabled"] = pick(raw, "mamba_enabled", default=True, kind=bool)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=2048, kind=int)
    cfg["attention_window_size"] = positive(
        "attention_window_size",
        pick(raw, "attention_window_size", "sliding_window", default=2048, kind=int),
    )
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
    out: list[Rule] = [Drop(r"(^|\.)rotary_emb\.inv_freq$", "recomputed from rope_theta", "rotary inv_freq buffers")]
    if cfg["tie_word_embeddings"]:
        out.append(Drop(r"^lm_head\.weight$", "tied: the head is model.embed_tokens.weight", "lm_head.weight"))
    out.append(ConvToMLX(r"\.mixer\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba conv1d weights"))
    out.append(
        KeepFloat32(SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_bias")
    )
    return out


ARCH = register(
    Architecture(
        model_type="plamo2",
        architectures=("Plamo2ForCausalLM",),
        title="PLaMo-2 (Mamba-2 + attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
    )
)
