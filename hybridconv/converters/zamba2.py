"""Zamba2 converter: config normalisation, shared-block rules and tensor rules.

Architecture and math: :mod:`hybridconv.models.zamba2`. mlx-lm has no Zamba2.

Config normalisation (the published Zamba2 configs and transformers 5's):

* the schedule from ``layers_block_type`` (or its alias ``layer_types``):
  ``"mamba"`` (published) or ``"linear_attention"`` (transformers 5) for a
  Mamba-2 layer, ``"hybrid"`` for a layer that calls a shared block; one entry
  per layer (``num_hidden_layers``); written in the published spelling, with
  ``hybrid_layer_ids`` recomputed from it.
* derived sizes exactly as transformers derives them, whatever the config
  says: ``attention_head_dim = 2·hidden_size / num_attention_heads``
  (attention reads ``[x | embeddings]``), ``mamba_headdim = mamba_expand ·
  hidden_size / n_mamba_heads``, ``intermediate_size`` null → ``4 ·
  hidden_size``, ``num_key_value_heads`` null → ``num_attention_heads``.
* ``rope_theta`` at the top level (published) or in ``rope_parameters``
  (transformers 5), used only with ``use_mem_rope``; only the default rope
  type. ``hidden_act`` one of the activations the model implements.

Shared blocks: transformers ties every call of shared block ``b`` to its first
caller (``model.layers.F.shared_transformer``, ``F`` = the ``b``-th hybrid
layer) and ``save_pretrained`` writes the tied weights once, under ``F``. The
rules:

* ``rename`` ``model.layers.F.shared_transformer.*`` →
  ``model.shared_blocks.b.*`` (one copy of the shared weights);
* ``rename`` the per-use adapters out of the block into the layer that uses
  them: adapter ``j`` of the block's ``gate_up_proj_adapter_list`` (and of
  ``linear_{q,k,v}_adapter_list`` with ``use_shared_attention_adapter``)
  belongs to the ``j``-th hybrid layer ``L`` →
  ``model.layers.L.gate_up_adapter.{0,1}`` (``.q_adapter`` …);
* with ``tie_word_embeddings = false`` transformers 5 ties nothing, so each
  hybrid layer's own ``shared_transformer`` becomes its own block
  ``model.shared_blocks.j`` (``tie_shared_blocks = false`` in the output) and
  the adapter slots of other calls in its lists, which it never uses, are
  dropped;
* ``drop`` a tied copy under a later caller
  (``model.layers.L.shared_transformer.*`` for ``L`` not a first caller), if a
  checkpoint holds one: transformers ignores it at load (the tie overrides it).

Verify's localisation hooks transformers' ``model.layers`` (one output per
layer, a hybrid layer's output after its Mamba step), which is what
:meth:`Model.__call__` records.

Other rules: ``drop`` rotary ``inv_freq`` buffers and a tied
``lm_head.weight``; ``conv1d-to-mlx`` the Mamba conv kernels; ``keep-float32``
``A_log``, ``D``, ``dt_bias``.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`; ``A_log``, ``D``, ``dt_bias`` float32, kept so
by the conversion; the rest in the output dtype, as mlx-lm stores them):
``A_log``, ``D``, ``dt_bias``, the conv1d kernels and biases, every norm weight (including the mixer's gated
norm and the shared block's 2·hidden input norm). Kept in float by default
(``default="float"``): the per-use low-rank adapters (rank ``adapter_rank``:
a small share of the parameters, and their input width may be the rank, below
any quantization group). Quantized (:data:`ROLES`): embeddings and head, the
mixers' ``in_proj`` / ``out_proj``, each hybrid layer's ``linear``, the shared
attention and MLP projections. Sensitive: embeddings, head, ``in_proj`` and
the shared MLP's ``down_proj`` (used by every hybrid layer: its error is
repeated at each call).
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import zamba2 as model_module
from ._common import MAMBA2_PROTECTED, MAMBA2_ROLES, head_rules, mamba2_mixer_rules, rope_theta
from .registry import Architecture, Role, register
from .rules import Drop, Rename, Rule

KIND_ALIASES = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "hybrid"}


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "zamba2"

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")

    key = next((k for k in ("layers_block_type", "layer_types") if raw.get(k) is not None), None)
    if key is None:
        raise ConfigError("config.json: required field 'layers_block_type' is missing (tried 'layers_block_type', 'layer_types')")
    kinds = raw[key]
    if not isinstance(kinds, list) or len(kinds) != n:
        raise ConfigError(f"config.json: '{key}' must be a list of {n} layer kinds (num_hidden_layers), found {kinds!r}")
    for i, kind in enumerate(kinds):
        if kind not in KIND_ALIASES:
            raise ConfigError(f"config.json: {key}[{i}] is {kind!r}; expected one of {', '.join(KIND_ALIASES)}")
    cfg.pop("layer_types", None)
    cfg["layers_block_type"] = [KIND_ALIASES[k] for k in kinds]
    cfg["hybrid_layer_ids"] = [i for i, k in enumerate(cfg["layers_block_type"]) if k == "hybrid"]

    inter = raw.get("intermediate_size")
    cfg["intermediate_size"] = positive("intermediate_size", pick({"i": inter if inter is not None else 4 * hidden}, "i", kind=int))
    act = cfg["hidden_act"] = pick(raw, "hidden_act", default="gelu", kind=str)
    if act not in model_module.ACTIVATIONS:
        raise ConfigError(
            f"config.json: hidden_act {act!r} is not supported (expected one of {', '.join(model_module.ACTIVATIONS)})"
        )
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads", default=32)
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=heads)
    if heads % kv:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    cfg["attention_head_dim"] = positive("attention_head_dim", 2 * hidden // heads)  # as transformers derives it
    if pick(raw, "use_shared_attention_adapter", default=False, kind=bool) and (kv != heads or (2 * hidden) % heads):
        raise ConfigError(
            f"config.json: use_shared_attention_adapter needs num_key_value_heads == num_attention_heads and "
            f"2·hidden_size divisible by it (found {kv} / {heads} heads, hidden_size {hidden}): transformers' "
            "q/k/v adapters output 2·hidden_size channels and fail otherwise"
        )
    cfg["attention_hidden_size"] = 2 * hidden
    cfg["num_mem_blocks"] = positive_int(raw, "num_mem_blocks", default=1)
    cfg["adapter_rank"] = positive_int(raw, "adapter_rank", default=128)
    for k, default in (
        ("use_shared_attention_adapter", False),
        ("use_mem_rope", False),
        ("add_bias_linear", False),
        ("tie_word_embeddings", True),
    ):
        cfg[k] = pick(raw, k, default=default, kind=bool)
    # transformers 5 ties the shared blocks only together with the embeddings
    # (see hybridconv.models.zamba2); the output states it.
    cfg["tie_shared_blocks"] = cfg["tie_word_embeddings"]
    cfg["rope_theta"] = rope_theta(raw)
    cfg.pop("rope_parameters", None)

    expand = cfg["mamba_expand"] = positive_int(raw, "mamba_expand", default=2)
    m_heads = cfg["n_mamba_heads"] = positive_int(raw, "n_mamba_heads", default=8)
    if (expand * hidden) % m_heads:
        raise ConfigError(
            f"config.json: n_mamba_heads ({m_heads}) must divide mamba_expand * hidden_size ({expand * hidden})"
        )
    cfg["mamba_headdim"] = expand * hidden // m_heads
    groups = cfg["mamba_ngroups"] = positive_int(raw, "mamba_ngroups", default=1)
    if m_heads % groups:
        raise ConfigError(f"config.json: n_mamba_heads ({m_heads}) must be a multiple of mamba_ngroups ({groups})")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state", default=64)
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    cfg["chunk_size"] = positive_int(raw, "chunk_size", default=256)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    t_min = cfg["time_step_min"] = pick(raw, "time_step_min", default=1e-3, kind=float)
    if t_min < 0:
        raise ConfigError(f"config.json: time_step_min must be >= 0, found {t_min}")
    return cfg


def shared_block_rules(cfg: dict, source: str = "shared_transformer", adapters: bool = True) -> list[Rule]:
    """Shared weights to ``model.shared_blocks.b``, per-use adapters to their layer,
    tied copies dropped (see module docstring). Zamba (v1) reuses it with its
    block under ``source = "shared_transf"`` and no adapters."""
    hyb = cfg["hybrid_layer_ids"]
    m = cfg["num_mem_blocks"]
    out: list[Rule] = []
    lists = [("feed_forward.gate_up_proj_adapter_list", "gate_up_adapter")] if adapters else []
    if adapters and cfg["use_shared_attention_adapter"]:
        lists += [(f"self_attn.linear_{p}_adapter_list", f"{p}_adapter") for p in "qkv"]
    if not cfg["tie_shared_blocks"]:
        # One block per hybrid layer, loaded from the layer's own copy; of its
        # adapter lists only entry j (its own call) is used.
        for j, layer in enumerate(hyb):
            for src, dst in lists:
                out.append(Rename(rf"^model\.layers\.{layer}\.{source}\.{src}\.{j}\.", f"model.layers.{layer}.{dst}."))
            if lists:
                out.append(
                    Drop(
                        rf"^model\.layers\.{layer}\.{source}\.(feed_forward\.gate_up_proj_adapter_list"
                        r"|self_attn\.linear_[qkv]_adapter_list)\.\d+\.",
                        "adapter slot of another call, unused by this layer's own (untied) block",
                        f"model.layers.{layer}.{source}.*_adapter_list.i (i != {j})",
                    )
                )
            out.append(Rename(rf"^model\.layers\.{layer}\.{source}\.", f"model.shared_blocks.{j}."))
        return out
    for j, layer in enumerate(hyb):
        first = hyb[j % m]
        for src, dst in lists:
            out.append(Rename(rf"^model\.layers\.{first}\.{source}\.{src}\.{j}\.", f"model.layers.{layer}.{dst}."))
    for b, first in enumerate(hyb[:m]):
        out.append(Rename(rf"^model\.layers\.{first}\.{source}\.", f"model.shared_blocks.{b}."))
    for j, layer in enumerate(hyb[m:], start=m):
        out.append(
            Drop(
                rf"^model\.layers\.{layer}\.{source}\.",
                f"tied copy of shared block {j % m} (model.layers.{hyb[j % m]}.{source}); "
                "transformers ties it at load",
                f"model.layers.{layer}.{source}.*",
            )
        )
    return out


def rules(cfg: dict) -> list[Rule]:
    return head_rules(cfg) + shared_block_rules(cfg) + mamba2_mixer_rules(cfg)


PROTECTED = MAMBA2_PROTECTED
ROLES = MAMBA2_ROLES + (
    Role("hybrid.linear", r"\.layers\.\d+\.linear\.weight$"),
    Role("shared.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("shared.k_proj", r"\.self_attn\.k_proj\.weight$"),
    Role("shared.v_proj", r"\.self_attn\.v_proj\.weight$"),
    Role("shared.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("shared.gate_up_proj", r"\.feed_forward\.gate_up_proj\.weight$"),
    Role("shared.down_proj", r"\.feed_forward\.down_proj\.weight$", sensitive=True),
    Role(
        "adapter",
        r"\.(gate_up|q|k|v)_adapter\.\d\.weight$",
        default="float",
        why="per-use low-rank adapters: few parameters, input width may be the rank",
    ),
)

ARCH = register(
    Architecture(
        model_type="zamba2",
        architectures=("Zamba2ForCausalLM",),
        title="Zamba2 (Mamba-2 + shared attention blocks)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
