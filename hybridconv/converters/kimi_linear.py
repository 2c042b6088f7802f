"""Kimi-Linear converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.kimi_linear`.

Config layouts
--------------
Two layouts are in use and both are read:

* the one **published with the original checkpoints** (remote code,
  ``moonshotai/Kimi-Linear-48B-A3B-*``): the KDA sizes and the schedule nested in
  ``linear_attn_config`` (``num_heads``, ``head_dim``, ``short_conv_kernel_size``,
  and *1-based* ``kda_layers`` / ``full_attn_layers``), ``first_k_dense_replace``
  (the first ``k`` feed-forward layers dense), ``moe_layer_freq``,
  ``mla_use_nope``, ``moe_router_activation_func``;
* the one **transformers 5 writes**: ``layer_types`` (``"linear_attention"`` /
  ``"full_attention"``), ``mlp_layer_types`` (``"dense"`` / ``"sparse"``),
  ``linear_num_heads``, ``linear_head_dim``, ``linear_conv_kernel_dim``, no
  ``rope_theta``.

Precedence follows transformers (``layer_types`` over the 1-based lists over
the default "MLA at every 4th layer from index 4"; ``mlp_layer_types`` over
``first_k_dense_replace``, default 1). The normalised config carries both
spellings, consistent with each other, plus ``rope_theta`` (unused — Kimi's MLA
has no rotary embedding — but a required field of mlx-lm's ``ModelArgs``), so
that mlx-lm reads it. ``tie_word_embeddings`` is written false: transformers'
Kimi-Linear never ties its head (the flag is inert there), so the head is
always the checkpoint's ``lm_head.weight``. Refused with a ConfigError naming the key: a
``layer_types`` that disagrees with ``linear_attn_config``'s lists, 1-based
lists that overlap or leave layers out, ``moe_layer_freq != 1`` (transformers
ignores it, mlx-lm and the remote code do not: the reference would be a
different model), ``mla_use_nope: false`` (the remote code then applies RoPE,
which neither transformers nor this port does), a router other than
``sigmoid``, an activation other than ``silu``.

Tensor rules
------------
Each rule matches both the checkpoint's names and the converted ones, so
converting an output again changes nothing.

* ``stack-experts`` the per-expert ``experts.{e}.w1/w3/w2.weight`` into
  ``mlp.switch_mlp.gate_proj/up_proj/down_proj.weight`` ``[E, out, in]``
  (mlx-lm's ``SwitchGLU`` layout).
* ``conv1d-to-mlx`` the three short-conv kernels ``{q,k,v}_conv1d.weight``
  ``[C, 1, K]`` to ``[C, K, 1]`` (K from the config).
* ``keep-float32`` ``A_log`` and ``dt_bias`` (the KDA decay
  ``-exp(A_log)·softplus(· + dt_bias)`` compounds over every step), the router
  ``gate.weight`` and ``e_score_correction_bias`` (transformers keeps them
  float32: a bf16 bias of ~1e-3 resolution reorders near-tied experts).
* ``rename`` to mlx-lm's names: ``block_sparse_moe`` -> ``mlp`` (the checkpoints
  call every feed-forward ``block_sparse_moe``, dense or not),
  ``mlp.gate.e_score_correction_bias`` -> ``mlp.e_score_correction_bias``,
  ``{q,k,v}_conv1d`` -> ``{q,k,v}_conv.conv``.
* ``kv_b_proj`` stays one matrix (mlx-lm's loader splits it into its absorbed
  ``embed_q`` / ``unembed_out`` itself; this port uses it both ways).
* everything else: cast to ``--dtype``.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`; float32 where the conversion keeps them so —
``A_log``, ``dt_bias``, the router — else the output dtype): ``A_log``, ``dt_bias``, the short
conv kernels (4 taps per channel), every norm (``input_layernorm``,
``post_attention_layernorm``, ``o_norm``, ``kv_a_layernorm``, ``q_a_layernorm``,
the final norm), the MoE router ``gate`` and its correction bias (``E × hidden``
per layer, about 0.03 % of the 48B model; mlx-lm keeps the router at 8 bits;
here it stays float because it only *chooses* experts and transformers
computes it in float32). Quantized at ``--bits`` (:data:`ROLES`): every other
projection, the stacked experts and the embeddings — the layers mlx-lm
quantizes. Matrices whose input dimension is not a multiple of the group size
stay float (on the tiny fixture: ``f_b_proj``, ``g_b_proj``, ``kv_b_proj`` and
the expert / shared ``down_proj``, input 16 or 32).

Sensitive roles (the wider width in ``mixed-L-H``), measured one role at a time
at 8 bits over the default 4-bit on ``kimi_linear-tiny`` (verify, 4 × 64
tokens; default mean KL 0.0231): embeddings 0.0170, KDA ``k_proj``/``v_proj``
0.0183, then MLA/KDA ``o_proj`` 0.0212 and ``q_proj`` 0.0206 (not marked: half
the gain for the same cost); the KDA forget-gate projections ``f_a``/``f_b``
0.0231, the output gate and ``b_proj`` 0.0231: no gain, so they are quantized
like the rest despite feeding the decay. Marked sensitive: embeddings / head,
KDA ``k_proj``/``v_proj``, the dense and shared ``down_proj`` (as for every
architecture here: the largest outliers in trained models).
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import kimi_linear as model_module
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rename, Rule, StackExperts

MIXER_TYPES = ("linear_attention", "full_attention")
MLP_TYPES = ("dense", "sparse")


def _one_based(raw: dict, key: str, n: int) -> list[int]:
    value = raw["linear_attn_config"].get(key)
    if not isinstance(value, list):
        raise ConfigError(f"config.json: linear_attn_config.{key} must be a list of layer numbers, found {value!r}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n:
            raise ConfigError(
                f"config.json: linear_attn_config.{key} entry {i!r} is not a layer number 1..{n} "
                "(the published config counts layers from 1)"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"config.json: linear_attn_config.{key} lists a layer twice: {value}")
    return value


def _layer_types(raw: dict, n: int) -> list[str]:
    lac = raw.get("linear_attn_config") or {}
    lists = None
    if "kda_layers" in lac or "full_attn_layers" in lac:
        kda = set(_one_based(raw, "kda_layers", n)) if "kda_layers" in lac else None
        full = set(_one_based(raw, "full_attn_layers", n)) if "full_attn_layers" in lac else None
        if kda is not None and full is not None:
            if kda & full:
                raise ConfigError(
                    f"config.json: linear_attn_config lists layer(s) {sorted(kda & full)} both in "
                    "kda_layers and full_attn_layers"
                )
            if kda | full != set(range(1, n + 1)):
                missing = sorted(set(range(1, n + 1)) - kda - full)
                raise ConfigError(
                    f"config.json: linear_attn_config.kda_layers and full_attn_layers leave layer(s) "
                    f"{missing} (1-based) unassigned; expected every layer 1..{n} in one of them"
                )
        if kda is None:
            kda = set(range(1, n + 1)) - full
        lists = ["linear_attention" if i + 1 in kda else "full_attention" for i in range(n)]
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        if lists is not None:
            return lists
        # transformers' default: MLA at every 4th layer from index 4.
        return ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    if len(types) != n or any(t not in MIXER_TYPES for t in types):
        raise ConfigError(
            f"config.json: layer_types must list {n} entries, each one of {', '.join(MIXER_TYPES)}; found {types!r}"
        )
    if lists is not None and lists != types:
        raise ConfigError(
            "config.json: layer_types and linear_attn_config.kda_layers/full_attn_layers describe different "
            f"schedules ({types} vs {lists}, the lists counting from 1)",
            "remove one of them or make them agree",
        )
    return list(types)


def _mlp_layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "mlp_layer_types", default=None, kind=list)
    if types is not None:
        if len(types) != n or any(t not in MLP_TYPES for t in types):
            raise ConfigError(
                f"config.json: mlp_layer_types must list {n} entries, each one of {', '.join(MLP_TYPES)}; "
                f"found {types!r}"
            )
        return list(types)
    freq = pick(raw, "moe_layer_freq", default=1, kind=int)
    if freq != 1:
        raise ConfigError(
            f"config.json: moe_layer_freq is {freq}; only 1 is supported (expected 1)",
            "transformers' Kimi-Linear ignores moe_layer_freq while the original code honours it; "
            "write the schedule as mlp_layer_types",
        )
    k = pick(raw, "first_k_dense_replace", default=1, kind=int)
    if k < 0:
        raise ConfigError(f"config.json: first_k_dense_replace must be >= 0, found {k}")
    return ["dense" if i < k else "sparse" for i in range(n)]


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "kimi_linear"

    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads")
    cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=heads)
    cfg["kv_lora_rank"] = positive_int(raw, "kv_lora_rank")
    q_rank = pick(raw, "q_lora_rank", default=None, kind=int)
    cfg["q_lora_rank"] = None if q_rank is None else positive("q_lora_rank", q_rank)
    cfg["qk_nope_head_dim"] = positive_int(raw, "qk_nope_head_dim")
    cfg["qk_rope_head_dim"] = positive_int(raw, "qk_rope_head_dim")
    cfg["v_head_dim"] = positive_int(raw, "v_head_dim")
    cfg["head_dim"] = pick(raw, "head_dim", default=cfg["qk_rope_head_dim"], kind=int)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    # transformers' KimiLinearForCausalLM never ties its head (``_tied_weights_keys``
    # is empty): whatever the flag says, the head is the checkpoint's lm_head.weight
    # (absent: the ledger fails naming it). Written false so mlx-lm keeps the head too.
    pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["tie_word_embeddings"] = False
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["model_max_length"] = pick(
        raw, "model_max_length", "max_position_embeddings", default=1048576, kind=int
    )
    # Unused (no RoPE in Kimi's MLA); mlx-lm's ModelArgs requires the key.
    cfg["rope_theta"] = pick(raw, "rope_theta", "rope_parameters.rope_theta", default=10000.0, kind=float)

    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act must be 'silu' (expected silu), found {act!r}")
    if pick(raw, "mla_use_nope", default=True, kind=bool) is not True:
        raise ConfigError(
            "config.json: mla_use_nope is false (expected true): the original code then applies RoPE in MLA, "
            "which transformers' Kimi-Linear (the reference) does not"
        )
    router = pick(raw, "moe_router_activation_func", default="sigmoid", kind=str)
    if router != "sigmoid":
        raise ConfigError(
            f"config.json: moe_router_activation_func is {router!r} (expected sigmoid, the only router "
            "transformers' Kimi-Linear implements)"
        )

    if raw.get("linear_attn_config") is not None and not isinstance(raw["linear_attn_config"], dict):
        raise ConfigError(
            f"config.json: linear_attn_config must be an object, found {type(raw['linear_attn_config']).__name__}"
        )
    layer_types = cfg["layer_types"] = _layer_types(raw, n)
    mlp_types = cfg["mlp_layer_types"] = _mlp_layer_types(raw, n)
    lin_heads = positive(
        "linear_attn_config.num_heads",
        pick(raw, "linear_attn_config.num_heads", "linear_num_heads", default=32, kind=int),
    )
    lin_dim = positive(
        "linear_attn_config.head_dim",
        pick(raw, "linear_attn_config.head_dim", "linear_head_dim", default=128, kind=int),
    )
    kernel = positive(
        "linear_attn_config.short_conv_kernel_size",
        pick(raw, "linear_attn_config.short_conv_kernel_size", "linear_conv_kernel_dim", default=4, kind=int),
    )
    cfg["linear_num_heads"], cfg["linear_head_dim"], cfg["linear_conv_kernel_dim"] = lin_heads, lin_dim, kernel
    lac = dict(raw.get("linear_attn_config") or {})
    lac.update(
        num_heads=lin_heads,
        head_dim=lin_dim,
        short_conv_kernel_size=kernel,
        kda_layers=[i + 1 for i, t in enumerate(layer_types) if t == "linear_attention"],
        full_attn_layers=[i + 1 for i, t in enumerate(layer_types) if t == "full_attention"],
    )
    cfg["linear_attn_config"] = lac

    cfg["moe_intermediate_size"] = positive_int(raw, "moe_intermediate_size", default=1024)
    experts = cfg["num_experts"] = positive_int(raw, "num_experts", "num_local_experts", "n_routed_experts", default=256)
    top_k = cfg["num_experts_per_token"] = positive_int(raw,
        "num_experts_per_token", "num_experts_per_tok", default=8
    )
    shared = pick(raw, "num_shared_experts", "n_shared_experts", default=1, kind=int)
    if shared < 0:
        raise ConfigError(f"config.json: num_shared_experts must be >= 0, found {shared}")
    cfg["num_shared_experts"] = shared
    cfg["moe_renormalize"] = pick(raw, "moe_renormalize", "norm_topk_prob", default=True, kind=bool)
    cfg["routed_scaling_factor"] = pick(raw, "routed_scaling_factor", default=2.446, kind=float)
    groups = cfg["num_expert_group"] = positive_int(raw, "num_expert_group", "n_group", default=1)
    topk_group = cfg["topk_group"] = positive_int(raw, "topk_group", default=1)
    if "sparse" in mlp_types:
        if top_k > experts:
            raise ConfigError(
                f"config.json: num_experts_per_token ({top_k}) is more than num_experts ({experts})"
            )
        if experts % groups:
            raise ConfigError(
                f"config.json: num_experts ({experts}) is not a multiple of num_expert_group ({groups})"
            )
        if topk_group > groups:
            raise ConfigError(f"config.json: topk_group ({topk_group}) is more than num_expert_group ({groups})")
    # mlx-lm's spelling of the feed-forward schedule: the first k layers dense.
    # (A schedule that is not "k dense, then MoE" has no such spelling; mlx-lm then
    # builds other layers and its loader fails on the weights.)
    lead = next((i for i, t in enumerate(mlp_types) if t == "sparse"), n)
    cfg["first_k_dense_replace"] = lead
    cfg["moe_layer_freq"] = 1
    return cfg


# Each rule matches the checkpoint's names *and* the converted ones (so that
# ``inspect`` counts what it will touch, and converting an output is a no-op).
FFN = r"\.(?:block_sparse_moe|mlp)\."


def rules(cfg: dict) -> list[Rule]:
    out: list[Rule] = []
    for src, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        out.append(
            StackExperts(
                rf"^(?P<pre>.*){FFN}experts\.(?P<expert>\d+)\.{src}\.weight$",
                rf"\g<pre>.mlp.switch_mlp.{dst}.weight",
                cfg["num_experts"],
                f"experts' {src} ({dst})",
            )
        )
    out += [
        ConvToMLX(
            r"\.self_attn\.(q|k|v)_conv(1d|\.conv)\.weight$",
            cfg["linear_conv_kernel_dim"],
            "KDA short-conv kernels",
        ),
        KeepFloat32(
            r"\.self_attn\.(A_log|dt_bias)$",
            "KDA decay parameters: rounding compounds over every step",
            "A_log, dt_bias",
        ),
        KeepFloat32(
            FFN + r"(gate\.weight|(gate\.)?e_score_correction_bias)$",
            "the router chooses the experts; transformers keeps it float32",
            "MoE router weight and score-correction bias",
        ),
        Rename(FFN + r"gate\.e_score_correction_bias$", ".mlp.e_score_correction_bias"),
        Rename(r"\.block_sparse_moe\.", ".mlp."),
        Rename(r"\.self_attn\.(q|k|v)_conv1d\.weight$", r".self_attn.\1_conv.conv.weight"),
    ]
    return out


PROTECTED = (
    Protected(r"\.self_attn\.(A_log|dt_bias)$", "KDA decay: -exp(A_log)·softplus(. + dt_bias) compounds over steps"),
    Protected(r"\.self_attn\.(q|k|v)_conv\.conv\.weight$", "short-conv kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
    Protected(r"\.mlp\.(gate\.weight|e_score_correction_bias)$", "MoE router: chooses the experts (float32 in transformers)"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("attn.q_proj", r"\.self_attn\.(q_proj|q_a_proj|q_b_proj)\.weight$"),
    Role("kda.kv_proj", r"\.self_attn\.(k|v)_proj\.weight$", sensitive=True),
    Role("kda.forget_gate", r"\.self_attn\.f_(a|b)_proj\.weight$"),
    Role("kda.beta_proj", r"\.self_attn\.b_proj\.weight$"),
    Role("kda.output_gate", r"\.self_attn\.g_(a|b)_proj\.weight$"),
    Role("mla.kv_a_proj", r"\.self_attn\.kv_a_proj_with_mqa\.weight$"),
    Role("mla.kv_b_proj", r"\.self_attn\.kv_b_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("moe.experts.gate_up", r"\.mlp\.switch_mlp\.(gate|up)_proj\.weight$"),
    Role("moe.experts.down", r"\.mlp\.switch_mlp\.down_proj\.weight$"),
    Role("moe.shared.gate_up", r"\.mlp\.shared_experts\.(gate|up)_proj\.weight$"),
    Role("moe.shared.down", r"\.mlp\.shared_experts\.down_proj\.weight$", sensitive=True),
    Role("mlp.gate_up_proj", r"\.mlp\.(gate|up)_proj\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="kimi_linear",
        architectures=("KimiLinearForCausalLM",),
        title="Kimi-Linear (KDA + MLA, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
