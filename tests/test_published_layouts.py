"""Published layouts: for every architecture, one checkpoint whose tensor names,
dtypes and sharding follow the published release where they differ from what
transformers 5.24's ``save_pretrained`` writes (the oracle fixtures).

Each case takes an oracle fixture's weights and writes them as the release
stores them: bf16 with the SSM / decay tensors in float32 (or float32
throughout, as mamba-130m-hf and recurrentgemma-2b), several shards with an
index, and the release's own names — ``mtp.*`` multi-token-prediction tensors,
Kimi-Linear's dense first layer under ``mlp.*``, OLMo-Hybrid's
``input_layernorm`` / ``post_attention_layernorm`` and q/k/v conv kernels cut
at the key/value sizes (2880/2880/5760 in the 7B release, not three equal
thirds), Nemotron-H's ``backbone.`` with per-expert tensors, Qwen3.5 as a
flattened or nested multimodal wrapper with its vision tower, Qwen3.5-MoE's
fused experts, Mamba-Codestral's extra ``consolidated.safetensors`` — and,
where the release states it so, its config layout. The reference is
transformers reading *that* folder through its conversion mappings (the same
loader verify uses; PLaMo-2, which transformers lacks: hybridconv's PyTorch
port); hybridconv's float32 conversion must match it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.verify.inputs import Inputs
from hybridconv.verify.reference import compute_reference

from .conftest import assert_logits_close, hybrid_case, oracle_logits, FIXTURES

SSM_F32 = ("A_log", ".D", "dt_bias", "dt_proj.bias")  # kept float32 by the releases that keep anything


def _rng_tensor(shape, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.05


def publish(case: str, dst: Path, transform=None, dtype="bf16", f32=SSM_F32, shards: int = 2,
            config=None, extra_files: dict | None = None) -> Path:
    """The fixture ``case`` written as a release: ``transform(tensors) -> tensors``
    (names, splits, added tensors), float tensors in ``dtype`` ("bf16" or "f32";
    names ending with one of ``f32`` stay float32), ``shards`` shards with an
    index (1: a single model.safetensors), ``config(dict) -> dict``, and extra
    files ``{name: bytes}``."""
    import torch
    from safetensors.torch import load_file, save_file

    src = hybrid_case(case) if not case.startswith("/") else Path(case)
    tensors = load_file(str(src / "model.safetensors"))
    if transform is not None:
        tensors = transform(tensors)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point() and dtype == "bf16" and not any(name.endswith(s) for s in f32):
            t = t.to(torch.bfloat16)
        out[name] = t.contiguous()
    dst.mkdir(parents=True)
    names = sorted(out)
    if shards == 1:
        save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: out[n] for n in part}, str(dst / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in out.values())},
             "weight_map": weight_map}, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = {"bf16": "bfloat16", "f32": "float32"}[dtype]
    if config is not None:
        cfg = config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    for name, data in (extra_files or {}).items():
        (dst / name).write_bytes(data)
    return dst


# --- the published layouts, one per architecture ---------------------------------------------


def _mtp(hidden: int, prefix: str = "mtp."):
    """A multi-token-prediction module's tensors (as Qwen3-Next / Qwen3.5 / Nemotron
    releases ship them; transformers ignores them, so must the conversion)."""
    return {f"{prefix}fc.weight": _rng_tensor((hidden, 2 * hidden), 1),
            f"{prefix}norm.weight": _rng_tensor((hidden,), 2),
            f"{prefix}pre_fc_norm_embedding.weight": _rng_tensor((hidden,), 3),
            f"{prefix}layers.0.self_attn.q_proj.weight": _rng_tensor((hidden, hidden), 4)}


def _qwen3_next(t):
    return {**t, **_mtp(64)}


def _qwen3_next_config(c):
    """Qwen3-Next-80B-A3B's config.json: top-level rope_theta /
    partial_rotary_factor, full_attention_interval, no layer_types."""
    rope = c.pop("rope_parameters")
    c.pop("layer_types")
    c.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
             full_attention_interval=4, num_nextn_predict_layers=1)
    return c


def _qwen3_5_flattened(t):
    """A Qwen3.5 derivative saved by transformers 5.2: every language tensor under
    model.language_model., the vision tower beside it, mtp.* at the top."""
    out = {("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k: v
           for k, v in t.items()}
    out["model.visual.blocks.0.attn.qkv.weight"] = _rng_tensor((96, 32), 5)
    out["model.visual.merger.linear_fc1.weight"] = _rng_tensor((64, 32), 6)
    return {**out, **_mtp(64)}


def _flattened_config(c):
    return {**c, "architectures": ["Qwen3_5ForConditionalGeneration"]}


def _qwen3_5_moe_nested(t):
    """Qwen3.5-MoE as released: nested wrapper, model.language_model.*, the vision
    tower, mtp.*, experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    import torch

    out = {}
    for k, v in t.items():
        if ".mlp.experts." in k:
            continue
        out[("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k] = v
    layers = sorted({int(k.split(".")[2]) for k in t if ".mlp.experts." in k})
    for i in layers:
        pre = f"model.layers.{i}.mlp.experts"
        n = len({k.split(".")[5] for k in t if k.startswith(pre + ".")})
        gate_up = torch.stack([torch.cat([t[f"{pre}.{e}.gate_proj.weight"], t[f"{pre}.{e}.up_proj.weight"]])
                               for e in range(n)])
        down = torch.stack([t[f"{pre}.{e}.down_proj.weight"] for e in range(n)])
        out[f"model.language_model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
        out[f"model.language_model.layers.{i}.mlp.experts.down_proj"] = down
    out["model.visual.patch_embed.proj.weight"] = _rng_tensor((32, 3, 2, 4, 4), 7)
    return {**out, **_mtp(64)}


def _nested_config(c):
    text = dict(c)
    text.pop("architectures", None)
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "tie_word_embeddings": c.get("tie_word_embeddings", False),
            "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "out_hidden_size": 64, "patch_size": 4, "temporal_patch_size": 2,
                              "spatial_merge_size": 1},
            "dtype": c.get("dtype")}


def _olmo_released(t):
    """OLMo-Hybrid as released (and as mlx-lm loads it): input_layernorm /
    post_attention_layernorm, and q/k/v conv kernels of Kd, Kd, Vd rows (48, 48,
    96 here) where transformers 5 saves three equal thirds (64, 64, 64)."""
    import torch

    out = {}
    for k, v in t.items():
        k = k.replace(".attention_layer_norm.", ".input_layernorm.").replace(
            ".feedforward_layer_norm.", ".post_attention_layernorm.")
        out[k] = v
    for k in [k for k in out if k.endswith("linear_attn.q_conv1d.weight")]:
        pre = k.removesuffix("q_conv1d.weight")
        fused = torch.cat([out[pre + f"{p}_conv1d.weight"] for p in "qkv"])
        kd = 4 * 12
        for p, (a, b) in zip("qkv", ((0, kd), (kd, 2 * kd), (2 * kd, fused.shape[0]))):
            out[pre + f"{p}_conv1d.weight"] = fused[a:b].clone()
    return out


def _kimi_released(t):
    """Kimi-Linear-48B-A3B as released: the dense first layer's MLP under mlp.*
    (transformers 5 saves every feed-forward as block_sparse_moe)."""
    return {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in t.items()}


def _kimi_config(c):
    """The remote-code config.json (linear_attn_config with 1-based layer lists,
    first_k_dense_replace, top-level rope_theta)."""
    kinds = c.pop("layer_types")
    c.pop("mlp_layer_types")
    heads, dim, kernel = c.pop("linear_num_heads"), c.pop("linear_head_dim"), c.pop("linear_conv_kernel_dim")
    c.update(rope_theta=10000.0, first_k_dense_replace=1, moe_layer_freq=1, mla_use_nope=True,
             moe_router_activation_func="sigmoid",
             linear_attn_config=dict(kda_layers=[i + 1 for i, k in enumerate(kinds) if k == "linear_attention"],
                                     full_attn_layers=[i + 1 for i, k in enumerate(kinds) if k == "full_attention"],
                                     num_heads=heads, head_dim=dim, short_conv_kernel_size=kernel))
    return c


def _nemotron(t):
    return {**t, **_mtp(64)}


def _nemotron_config(c):
    from .test_arch_nemotron_h import _published

    return _published(c)


def _lfm2_config(c):
    from .test_arch_lfm2 import _published

    return _published(c)


def _codestral_files():
    from safetensors.torch import save

    return {"consolidated.safetensors": save({"layers.0.mixer.A_log": _rng_tensor((8,), 9)}),
            "params.json": b'{"dim": 64}'}


# case -> (fixture, publish() arguments, what the case shows)
CASES = {
    "bamba": ("bamba-tiny", dict(shards=3), "bf16 with float32 A_log/D/dt_bias, 3 shards"),
    "falcon_h1": ("falcon_h1-tiny", dict(), "bf16 with float32 SSM tensors, 2 shards"),
    "falcon_mamba": ("falcon_mamba-tiny", dict(), "falcon-mamba-7b: bf16, backbone.*, 2 shards"),
    "granitemoehybrid": ("granitemoehybrid-tiny", dict(shards=3), "Granite-4.0-H: bf16, fused input_linear, 3 shards"),
    "jamba": ("jamba-tiny", dict(shards=3), "Jamba: bf16, per-expert tensors, 3 shards"),
    "kimi_linear": ("kimi_linear-tiny", dict(transform=_kimi_released, config=_kimi_config,
                                             f32=SSM_F32 + ("gate.weight", "e_score_correction_bias")),
                    "Kimi-Linear-48B-A3B: dense layer 0 under mlp.*, remote-code config, bf16"),
    "lfm2": ("lfm2-tiny", dict(shards=1, config=_lfm2_config), "LFM2: bf16 single file, Liquid's config keys"),
    "lfm2_moe": ("lfm2_moe-tiny", dict(f32=("expert_bias",)),
                 "LFM2-8B-A1B: bf16, per-expert w1/w2/w3, float32 expert_bias, 2 shards"),
    "mamba": ("mamba-tiny", dict(dtype="f32", shards=1), "mamba-130m-hf: float32, one file, tied head"),
    "mamba2": ("mamba2-tiny", dict(extra_files=_codestral_files()),
               "Mamba-Codestral: bf16 shards with an index beside consolidated.safetensors"),
    "nemotron_h": ("nemotron_h-tiny", dict(transform=_nemotron, config=_nemotron_config),
                   "Nemotron-H: backbone.*, per-expert tensors, mtp.*, hybrid_override_pattern"),
    "olmo_hybrid": ("olmo_hybrid-tiny", dict(transform=_olmo_released, f32=("A_log", "dt_bias")),
                    "OLMo-Hybrid: input/post_attention_layernorm, q/k/v conv 48/48/96"),
    "plamo2": ("/plamo2-tiny", dict(f32=("A_log", ".D", "dt_bias")), "PLaMo-2: bf16 with float32 SSM, 2 shards"),
    "qwen3_next": ("qwen3_next-tiny", dict(transform=_qwen3_next, config=_qwen3_next_config, shards=3,
                                           f32=("A_log",)),
                   "Qwen3-Next-80B-A3B: mtp.*, published config, bf16 (float32 A_log), 3 shards"),
    "qwen3_5": ("qwen3_5-tiny", dict(transform=_qwen3_5_flattened, config=_flattened_config, f32=("A_log",)),
                "Qwen3.5 derivative: flattened config, model.language_model.*, vision tower, mtp.*"),
    "qwen3_5_moe": ("qwen3_5_moe-tiny", dict(transform=_qwen3_5_moe_nested, config=_nested_config, f32=("A_log",)),
                    "Qwen3.5-MoE release: nested wrapper, fused experts, vision tower, mtp.*"),
    "recurrent_gemma": ("/recurrent_gemma-tiny-hf5", dict(dtype="f32", f32=()),
                        "recurrentgemma-2b: float32, 2 shards"),
    "zamba2": ("zamba2-tiny", dict(shards=3), "Zamba2: bf16 with float32 SSM tensors, 3 shards"),
}


def _fixture(name: str) -> str:
    return str(FIXTURES / name[1:]) if name.startswith("/") else name


@pytest.mark.parametrize("arch", sorted(CASES))
def test_published_layout_matches_transformers(arch, tmp_path):
    fixture, kw, what = CASES[arch]
    src = publish(_fixture(fixture), tmp_path / "src", **kw)
    case_dir = FIXTURES / fixture[1:] if fixture.startswith("/") else hybrid_case(fixture)
    ids, oracle = oracle_logits(case_dir)
    ref = compute_reference(resolve(str(src)), Inputs([ids[0]], "oracle ids"), keep_hidden=False)
    ref_logits = np.asarray(ref.outputs[0]["logits"])[None]
    if kw.get("dtype") == "f32":  # the same weights: the layout does not change the function
        assert_logits_close(ref_logits, oracle)
    p = plan(resolve(str(src)))
    assert p.arch.model_type == {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}.get(arch, arch)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    got = np.array(hybridconv.load(out)(mx.array(ids)))
    print(f"{arch}: {what}: max |Δ| vs transformers {np.abs(got - ref_logits).max():.3g} "
          f"(max |logit| {np.abs(ref_logits).max():.3g}; reference {ref.implementation})")
    assert_logits_close(got, ref_logits)
    dropped = {s.source: s.dropped_because for s in p.dropped}
    for name, why in dropped.items():  # what the release holds beyond the model is dropped with its reason
        assert why, name
    if "mtp" in what:
        assert any(n.startswith("mtp.") for n in dropped) and all(
            "multi-token" in w for n, w in dropped.items() if n.startswith("mtp."))
    if "vision tower" in what:
        assert any(n.startswith("model.visual.") and "vision tower" in w for n, w in dropped.items())


def test_mamba_codestral_ignores_consolidated(tmp_path):
    """A local copy of the release, consolidated.safetensors included: the index
    decides the weights; the Mistral-format file is never read."""
    src = publish("mamba2-tiny", tmp_path / "src", extra_files=_codestral_files())
    p = plan(resolve(str(src)))
    assert {s.name for s in p.index.shards} == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_bf16_release_converts_to_bf16_keeping_float32_dynamics(tmp_path):
    """The default output dtype of a bf16 release with float32 SSM tensors is bf16;
    the dynamics stay float32 (as the converters keep them), the rest bf16."""
    src = publish("nemotron_h-tiny", tmp_path / "src", transform=_nemotron)
    out = tmp_path / "out"
    convert(str(src), out)
    w = {}
    for f in out.glob("model*.safetensors"):
        w.update(mx.load(str(f)))
    assert w["backbone.layers.0.mixer.A_log"].dtype == mx.float32
    assert w["backbone.layers.0.mixer.in_proj.weight"].dtype == mx.bfloat16
    assert not any(k.startswith("mtp.") for k in w)
