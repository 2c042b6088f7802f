"""What mlx-lm's OWN model does with hybridconv's output, per architecture, from
the normalised config alone: ``hybridconv inspect`` shows it before any
conversion, ``verify --runtime mlx-lm`` measures it, and
``scripts/mlx_lm_runtimes.py`` checks these statements against measurements
on every oracle case. ``--mlx-lm-code auto`` follows them: an output whose
statement is anything but ``computes`` carries hybridconv's own model for
mlx-lm (:mod:`hybridconv.mlx_lm_code`), which mlx-lm then runs with
``trust_remote_code``; an architecture without a statement (``unknown``) is
carried too.

One check per ``model_type`` (the key an architecture registers under), each
returning an :class:`~.registry.MlxLm`:

* ``computes`` — mlx-lm opens the output and computes the reference's function;
* ``differs`` — it opens the output and computes another function (why);
* ``depends`` — it opens the output and differs only where the weights or the
  inputs reach a case it treats differently (a clip, a window): verify tells;
* ``cannot open`` — it has no such model, or refuses this config or these
  weights (why).

What was measured, with mlx-lm 0.32.2 on the fixtures and on the unseen cases
of tests/test_arch_*.py, is cited in each check. A converter module may
instead pass its own check as ``Architecture(mlx_lm=...)``; the registry's
field wins over this table.
"""

from __future__ import annotations

from typing import Callable

from .registry import MlxLm

MEASURED_WITH = "0.32.2"


def _ok(reason: str = "") -> MlxLm:
    return MlxLm("computes", reason, MEASURED_WITH)


def _differs(reason: str) -> MlxLm:
    return MlxLm("differs", reason, MEASURED_WITH)


def _depends(reason: str) -> MlxLm:
    return MlxLm("depends", reason, MEASURED_WITH)


def _cannot(reason: str) -> MlxLm:
    return MlxLm("cannot open", reason, MEASURED_WITH)


def _absent(title: str, model_type: str) -> Callable[[dict], MlxLm]:
    return lambda cfg: _cannot(f"mlx-lm has no {title} model (model_type {model_type!r} not supported)")


def _groups(n: int, key: str) -> MlxLm:
    return _differs(f"mlx-lm's gated RMSNorm normalises over the whole SSM width, ignoring {key} = {n} "
                    "(the reference normalises each group); no weight rewrite can express that")


def plamo2(cfg: dict) -> MlxLm:
    from ..models import plamo2 as m

    args = m.ModelArgs.from_dict(cfg)
    n, step = args.num_hidden_layers, args.mamba_step
    if args.mamba_enabled and n <= step // 2:
        return _cannot(f"num_hidden_layers {n} <= mamba_step // 2 (the last layer is the only attention layer): "
                       "mlx-lm loads the weights, then fails computing any input (IndexError in its layer "
                       "indexing; measured with 1 layer / mamba_step 4, 2 / 4 and 3 / 8)")
    windows = [w for w in m.layer_windows(args) if w is not None]
    clip = "mlx-lm clips time steps to [1e-3, 100] (the authors' model does not)"
    if windows and min(windows) + 1 < args.max_position_embeddings:
        w = min(windows)
        return _differs(f"mlx-lm applies no attention window (attention_window_size {w}): differs on inputs "
                        f"longer than {w + 1} tokens; also {clip}")
    if not args.mamba_enabled:
        return _ok()
    return _depends(f"{clip}: differs where a time step falls below 1e-3, which depends on the weights and inputs")


def recurrent_gemma(cfg: dict) -> MlxLm:
    why = []
    if cfg["lru_width"] != cfg["hidden_size"]:
        why.append(f"lru_width {cfg['lru_width']} != hidden_size {cfg['hidden_size']} (mlx-lm builds the RG-LRU "
                   "hidden_size wide)")
    if cfg["conv1d_width"] != 4:
        why.append(f"conv1d_width {cfg['conv1d_width']} (mlx-lm's temporal conv is 4 wide)")
    return _cannot("; ".join(why) + ": its loader refuses the weights") if why else _ok()


def mamba(cfg: dict) -> MlxLm:
    return _ok()


def mamba2(cfg: dict) -> MlxLm:
    n = cfg.get("n_groups", 1)
    return _groups(n, "n_groups") if n > 1 else _ok()


def jamba(cfg: dict) -> MlxLm:
    E = cfg.get("num_experts", 1)
    if E <= 1:
        return _ok()
    period, offset = cfg["expert_layer_period"], cfg["expert_layer_offset"]
    ours = [i % period == offset for i in range(cfg["num_hidden_layers"])]
    theirs = [(i + offset) % period == 0 for i in range(cfg["num_hidden_layers"])]
    if ours != theirs:
        return _cannot(f"mlx-lm puts experts where (i + expert_layer_offset) % expert_layer_period == 0, Jamba "
                       f"where i % {period} == {offset}: other layers, so its loader refuses the weights")
    return _differs(f"mlx-lm takes the softmax over the top-{cfg['num_experts_per_tok']} router logits "
                    "(renormalised weights); Jamba weights the experts by the full softmax's top-k, not "
                    "renormalised. No weight rewrite can express that")


def granitemoehybrid(cfg: dict) -> MlxLm:
    n = cfg.get("mamba_n_groups", 1)
    if n > 1 and "mamba" in cfg["layer_types"]:
        return _groups(n, "mamba_n_groups")
    return _ok()


def nemotron_h(cfg: dict) -> MlxLm:
    k = cfg.get("num_experts_per_tok")
    if "moe" in cfg["layers_block_type"] and k == 1 and cfg.get("norm_topk_prob"):
        return _differs("mlx-lm renormalises the top-k router weights only when k > 1: with "
                        "num_experts_per_tok 1 and norm_topk_prob it scales the expert by its raw score, "
                        "Nemotron-H by 1")
    return _ok()


def falcon_h1(cfg: dict) -> MlxLm:
    if not cfg.get("multipliers_folded"):
        return _differs("mlx-lm applies none of the µP multipliers to an MLX-layout folder (and misses "
                        "key_multiplier even on the source); convert with a hybridconv that folds them")
    n = cfg.get("mamba_n_groups", 1)
    if n > 1 and cfg.get("mamba_rms_norm"):
        return _groups(n, "mamba_n_groups")
    lo, hi = (list(cfg.get("time_step_limit") or [0.0, None]) + [None])[:2]
    if (lo or 0.0) > 0.0 or hi is not None:
        return _depends(f"mlx-lm ignores time_step_limit [{lo}, {hi}]: differs where a time step falls outside "
                        "it, which depends on the weights and inputs")
    return _ok("the multipliers are folded into the weights")


def kimi_linear(cfg: dict) -> MlxLm:
    why = []
    if "full_attention" not in cfg["layer_types"]:
        why.append("no MLA layer (mlx-lm's model indexes its first one)")
    if cfg.get("q_lora_rank"):
        why.append(f"q_lora_rank {cfg['q_lora_rank']} (mlx-lm's MLA has no query LoRA)")
    if cfg.get("attention_bias"):
        why.append("attention_bias (mlx-lm's MLA has no biases)")
    kinds = cfg.get("mlp_layer_types") or []
    k = next((i for i, t in enumerate(kinds) if t != "dense"), len(kinds))
    if any(t != "sparse" for t in kinds[k:]):
        why.append(f"dense and MoE layers {kinds} are not the first k dense then all MoE (mlx-lm's "
                   "first_k_dense_replace)")
    if why:
        return _cannot("; ".join(why))
    return _ok("its kv_a_layernorm uses rms_norm_eps 1e-5 where transformers uses 1e-6, "
               "within float32 tolerance (measured: logits 3.2e-5 apart on kimi_linear-tiny)")


def lfm2(cfg: dict) -> MlxLm:
    why = []
    if not cfg.get("tie_word_embeddings", True):
        why.append("an untied lm_head (mlx-lm's LFM2 always ties the head and refuses lm_head.weight)")
    if "full_attention" not in cfg["layer_types"]:
        why.append("no attention layer (mlx-lm indexes full_attn_idxs[0])")
    return _cannot("; ".join(why)) if why else _ok()


def _qwen_interval(cfg: dict) -> MlxLm | None:
    n = cfg.get("full_attention_interval")
    kinds = cfg["layer_types"]
    if not isinstance(n, int) or n <= 0:
        return _cannot("no full_attention_interval (mlx-lm reads the layer schedule only from it)")
    want = ["linear_attention" if (i + 1) % n else "full_attention" for i in range(len(kinds))]
    if kinds != want:
        return _cannot(f"layer_types is not attention at every {n}th layer: mlx-lm builds its schedule from "
                       "full_attention_interval only and refuses the weights")
    return None


def qwen3_next(cfg: dict) -> MlxLm:
    return _qwen_interval(cfg) or _ok()


def olmo_hybrid(cfg: dict) -> MlxLm:
    return _ok()


def bailing_hybrid(cfg: dict) -> MlxLm:
    """mlx-lm's ``bailing_moe_v3`` module (chosen by ``architectures:
    BailingMoeV3ForCausalLM``, which the converter writes); measured in
    tests/test_arch_bailing_hybrid.py."""
    n, g = cfg["num_hidden_layers"], cfg["layer_group_size"]
    theirs = ["full_attention" if (i + 1) % g == 0 or i >= n // g * g else "linear_attention" for i in range(n)]
    why = []
    if cfg["layer_types"] != theirs:
        why.append(f"layer_types is not MLA at every {g}th layer and after the last whole group (mlx-lm builds its "
                   "schedule from layer_group_size only; its loader refuses the weights)")
    mlps = cfg["mlp_layer_types"]
    k = cfg["first_k_dense_replace"]
    if mlps != ["dense"] * k + ["sparse"] * (n - k):
        why.append(f"dense and MoE layers {mlps} are not the first k dense then all MoE")
    if cfg.get("attention_bias"):
        why.append("attention_bias (mlx-lm's MLA has no biases)")
    if not cfg.get("kda_safe_gate", True):
        why.append("kda_safe_gate false (mlx-lm implements only the bounded forget gate)")
    if cfg["linear_num_heads"] != cfg["num_attention_heads"]:
        why.append(f"linear_num_heads {cfg['linear_num_heads']} != num_attention_heads (mlx-lm's KDA has as many "
                   "heads as MLA)")
    if why:
        return _cannot("; ".join(why))
    if not cfg.get("norm_topk_prob", True):
        return _differs("mlx-lm always renormalises the chosen experts' weights (norm_topk_prob is false here)")
    if cfg["rms_norm_eps"] != 1e-6:
        return _differs(f"mlx-lm's MLA latent norms use rms_norm_eps ({cfg['rms_norm_eps']}) where transformers "
                        "uses 1e-6")
    return _ok("through its bailing_moe_v3 module (architectures BailingMoeV3ForCausalLM, written by the "
               "converter); measured 1.9e-6 on bailing_hybrid-tiny")


CHECKS: dict[str, Callable[[dict], MlxLm]] = {
    "plamo2": plamo2,
    "recurrent_gemma": recurrent_gemma,
    "mamba": mamba,
    "falcon_mamba": mamba,
    "mamba2": mamba2,
    "jamba": jamba,
    "bamba": _absent("Bamba", "bamba"),
    "granitemoehybrid": granitemoehybrid,
    "nemotron_h": nemotron_h,
    "falcon_h1": falcon_h1,
    "zamba2": _absent("Zamba2", "zamba2"),
    "kimi_linear": kimi_linear,
    "lfm2": lfm2,
    "lfm2_moe": lfm2,
    "lfm3": _absent("LFM3", "lfm3"),
    "zaya": _absent("ZAYA1", "zaya"),
    "inkling_text": _absent("Inkling", "inkling_text"),
    "inkling2_text": _absent("Inkling-2", "inkling2_text"),
    "inkling2_loop_text": _absent("Inkling-2-Mini", "inkling2_loop_text"),
    "qwen3_next": qwen3_next,
    "qwen3_5_text": qwen3_next,  # Qwen3.5-MoE has experts in every layer, as mlx-lm builds it
    "qwen3_5_moe_text": qwen3_next,
    "olmo_hybrid": olmo_hybrid,
    "lara_mini": _absent("Lara-Mini", "lara_mini"),
    "minimax": lambda cfg: _cannot("mlx-lm's 'minimax' module is MiniMax-M2 (softmax attention only, no lightning "
                                   "attention): its ModelArgs requires shared_intermediate_size and rotary_dim, "
                                   "and no configuration makes it build lightning layers"),
    "bailing_hybrid": bailing_hybrid,
    "zamba": _absent("Zamba", "zamba"),
    "rwkv": lambda cfg: _cannot("mlx-lm has no RWKV-4 model (model_type 'rwkv' not supported; its rwkv7 module is "
                                "RWKV-7, another recurrence and other weights)"),
    "xlstm": _absent("xLSTM", "xlstm"),
    # measured: "ValueError: Model type qwen4_exp_text not supported." (source and output alike)
    "qwen4_exp_text": _absent("Qwen4-Exp", "qwen4_exp_text"),
    # measured: "ValueError: Model type glm5_next not supported." (its glm_moe_dsa module is GLM-5's DSA
    # without KDA, hyper-connections or k-pools)
    "glm5_next": _absent("GLM-5.3-Flash", "glm5_next"),
}
