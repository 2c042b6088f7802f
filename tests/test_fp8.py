"""FP8 block-scaled sources (transformers' ``quant_method: fp8``): a tiny
Qwen3-Next written the way Qwen3-Next-80B-A3B-Instruct-FP8 is — linear weights
in float8_e4m3fn with a ``weight_scale_inv`` per block (here 32 x 24, so that
blocks at the right and bottom edges are partial), the rest in bf16, sharded
with an index — is inspected, converted (dequantized exactly, bf16 by
default), quantized directly, and verified against a reference that runs the
same dequantized weights. Other quantized sources are refused, naming the
method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.errors import HybridconvError, UsageError

from .conftest import assert_logits_close, random_ids, save_hf_transformers

BLOCK = (32, 24)


def fp8_blocks(w, block=BLOCK, dtype=None):
    """``w`` (torch, [..., R, C]) as FP8 codes and float32 ``weight_scale_inv``
    ``[..., ceil(R/bm), ceil(C/bn)]``: each block scaled so its largest value
    is the format's largest, as FP8 releases are made."""
    import torch

    dtype = dtype or torch.float8_e4m3fn
    bm, bn = block
    R, C = w.shape[-2:]
    gr, gc = math.ceil(R / bm), math.ceil(C / bn)
    pad = torch.zeros(*w.shape[:-2], gr * bm, gc * bn)
    pad[..., :R, :C] = w.float()
    tiles = pad.reshape(*w.shape[:-2], gr, bm, gc, bn)
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(dtype).max
    q = (tiles / scale_inv[..., :, None, :, None]).to(dtype)
    q = q.reshape(*w.shape[:-2], gr * bm, gc * bn)[..., :R, :C].contiguous()
    return q, scale_inv.float()


def dequant_reference(q, s, block=BLOCK):
    """The format's definition, independently: value x scale[i // bm, j // bn]."""
    R, C = q.shape[-2:]
    full = s.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :R, :C]
    return q.float() * full


KEPT = ("mlp.gate.weight", "shared_expert_gate.weight")  # routers stay bf16 (modules_to_not_convert)


def write_fp8_checkpoint(src: Path, dst: Path, e5m2: str | None = None, shards: int = 3) -> dict:
    """``src`` (a float checkpoint saved by transformers) rewritten as an FP8
    release: the decoder blocks' linear weights FP8 with block scales, the other
    tensors bf16 (``A_log``/``dt_bias`` float32, as the release keeps them),
    ``shards`` shards with an index, ``quantization_config`` in config.json.
    Returns ``{weight name: dequantized float32 torch tensor}``."""
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(src / "model.safetensors"))
    out, dequant = {}, {}
    for name, t in w.items():
        # the decoder blocks' linear layers, as the release (norms, conv kernels, routers stay)
        fp8 = ".layers." in name and t.ndim == 2 and name.endswith(".weight") and "norm" not in name \
            and not name.endswith(KEPT)
        if fp8:
            dt = torch.float8_e5m2 if e5m2 and e5m2 in name else torch.float8_e4m3fn
            q, s = fp8_blocks(t, dtype=dt)
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            dequant[name] = dequant_reference(q, s)
        elif name.endswith(("A_log", "dt_bias")):
            out[name] = t.float()
        else:
            out[name] = t.to(torch.bfloat16)
    dst.mkdir(parents=True)
    names = sorted(out)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: out[n] for n in part}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK),
                                  "modules_to_not_convert": ["lm_head", "model.embed_tokens", "mlp.gate"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dequant


def _qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=40, shared_expert_intermediate_size=48, max_position_embeddings=512,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        tie_word_embeddings=False,
    )
    return cfg, Qwen3NextForCausalLM


@pytest.fixture(scope="module")
def fp8_case(tmp_path_factory):
    """(FP8 source, its dequantized weights, ids, the reference's logits on them)."""
    from hybridconv.verify.inputs import Inputs
    from hybridconv.verify.reference import compute_reference

    root = tmp_path_factory.mktemp("fp8")
    cfg, cls = _qwen3_next()
    save_hf_transformers(root / "float", cfg, cls, seed=11)
    dequant = write_fp8_checkpoint(root / "float", root / "fp8", e5m2="layers.3.self_attn.o_proj")
    ids = random_ids(256, 40, batch=1, seed=11)
    ref = compute_reference(resolve(str(root / "fp8")), Inputs([ids[0]], "ids"), keep_hidden=False)
    return root / "fp8", dequant, ids, np.asarray(ref.outputs[0]["logits"])[None], ref


def test_reference_runs_the_dequantized_weights(fp8_case):
    """The reference seam (hybridconv.verify.torch_source.reference_loader): the
    transformers model holds exactly the dequantized weights (per-expert tensors
    fused by its conversion mapping), in float32."""
    import torch

    from hybridconv.config import read_config
    from hybridconv.verify.torch_source import reference_loader

    src, dequant, _, _, ref = fp8_case
    assert "Qwen3NextForCausalLM" in ref.implementation
    cls, where, extra = reference_loader(src, read_config(src))
    assert where is None and "state_dict" in extra
    model = cls.from_pretrained(where, dtype=torch.float32, **extra)
    params = dict(model.named_parameters())
    q = params["model.layers.3.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32
    assert torch.equal(q, dequant["model.layers.3.self_attn.q_proj.weight"])
    up = params["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2I, H], experts fused by transformers
    assert torch.equal(up[2, 40:], dequant["model.layers.0.mlp.experts.2.up_proj.weight"])


def test_streamed_reference_reads_the_same_dequantized_weights(fp8_case):
    """The reference one block at a time (verify/torch_stream.py) reads the FP8 weights
    through the same seam (checkpoint.model_tensors: scales attached, read dequantized):
    its logits equal the whole-model reference's."""
    from hybridconv.verify.inputs import Inputs
    from hybridconv.verify.reference import compute_reference

    src, _, ids, whole, _ = fp8_case
    streamed = compute_reference(resolve(str(src)), Inputs([ids[0]], "ids"), stream=True)
    assert streamed.execution["path"] == "streamed"
    got = np.asarray(streamed.outputs[0]["logits"])[None]
    assert float(np.abs(got - whole).max()) <= 1e-5 * max(1.0, float(np.abs(whole).max()))


def test_inspect_shows_the_fp8_source(fp8_case):
    from hybridconv.inspect import describe

    src, dequant, *_ = fp8_case
    info = describe(plan(resolve(str(src))))
    q = info["source_quantization"]
    assert q["method"] == "fp8" and q["weight_block_size"] == list(BLOCK) and q["dequantized"] == len(dequant)
    assert info["output_dtype"] == "bfloat16"
    by_rule = {r["rule"]: r for r in info["rules"]}
    assert by_rule["dequantize-fp8"]["matches"] == by_rule["dequantize-fp8"]["changes"] == len(dequant)
    assert by_rule["consume"]["matches"] == len(dequant)
    # parameter count: the model's, scales not counted
    float_info = describe(plan(resolve(str(src.parent / "float"))))
    assert info["parameters"] == float_info["parameters"]


def test_convert_dequantizes_exactly(fp8_case, tmp_path):
    """float32 output: every FP8 weight is its dequantized value bit for bit (the
    stacked experts too); the ledger names every dequantized tensor; the logits
    match the dequantized reference."""
    import torch

    src, dequant, ids, ref, _ = fp8_case
    out = tmp_path / "f32"
    convert(str(src), out, dtype="float32")
    w = {}
    for f in sorted(out.glob("model*.safetensors")):
        w.update(mx.load(str(f)))
    q = np.array(w["model.layers.1.linear_attn.in_proj_qkvz.weight"])
    assert np.array_equal(q, dequant["model.layers.1.linear_attn.in_proj_qkvz.weight"].numpy())
    stacked = np.array(w["model.layers.2.mlp.switch_mlp.down_proj.weight"])
    for e in range(4):
        assert np.array_equal(stacked[e], dequant[f"model.layers.2.mlp.experts.{e}.down_proj.weight"].numpy())
    e5 = dequant["model.layers.3.self_attn.o_proj.weight"]
    assert np.array_equal(np.array(w["model.layers.3.self_attn.o_proj.weight"]), e5.numpy())
    record = json.loads((out / "conversion.json").read_text())
    assert sorted(record["source_quantization"]["dequantized"]) == sorted(dequant)
    for t in record["tensors"]:
        if t["source"] in dequant:
            assert any(a.startswith("dequantize float8_e") for a in t["actions"]), t
        if t["source"].endswith("_scale_inv"):
            assert t["target"] is None and "multiplied into it" in t["dropped_because"]
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and "quantization" not in written
    assert_logits_close(np.array(hybridconv.load(out)(mx.array(ids))), ref)
    assert torch.is_tensor(e5)


def test_default_dtype_is_bf16(fp8_case, tmp_path):
    src, dequant, *_ = fp8_case
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    assert plan(resolve(str(src))).dtype == "BF16"
    import shutil

    no_dtype = tmp_path / "nodtype"
    shutil.copytree(src, no_dtype)
    (no_dtype / "config.json").write_text(json.dumps(cfg))
    p = plan(resolve(str(no_dtype)))
    assert p.dtype == "BF16"
    assert {s.dtype for s in p.kept if s.source in dequant} == {"BF16"}


def test_bf16_and_4bit_verify_against_the_dequantized_reference(fp8_case, tmp_path):
    """convert (bf16 by default) and quantize straight from the FP8 source, both
    verified against the reference on the same dequantized weights."""
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import build_inputs
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.run import verify_folder

    src = fp8_case[0]
    source = resolve(str(src))
    inputs = build_inputs(source.path, 256, random_tokens=64, num_sequences=2, seed=2)
    ref = compute_reference(source, inputs)
    bf16 = tmp_path / "bf16"
    convert(str(src), bf16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    q4 = tmp_path / "q4"
    res = quantize(str(src), q4)
    assert any(t.decision == "quantize" and t.step.dequantized for t in res.plan.tensors)
    for name, folder in (("bf16", bf16), ("q4", q4)):
        report = verify_folder(folder, ref).report
        print(name, report["verdict"], report["metrics"]["overall"]["kl_mean"])
        assert report["verdict"] == "pass", (name, report["failure_reasons"])


def test_missing_or_misshapen_scales_are_named(fp8_case, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = fp8_case[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"
    shard = bad / index["weight_map"][name]
    w = load_file(str(shard))
    w[name] = w[name][:1].clone()
    save_file(w, str(shard), metadata={"format": "pt"})
    with pytest.raises(HybridconvError, match=r"scales '.*experts\.1\.up_proj\.weight_scale_inv' have shape \[1, 3\]"):
        plan(resolve(str(bad)))
    del w[name]
    del index["weight_map"][name]
    save_file(w, str(shard), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HybridconvError, match=r"FP8 tensor\(s\) without scales.*experts\.1\.up_proj\.weight'"):
        plan(resolve(str(bad)))


@pytest.mark.parametrize("qc, needle", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
    ({"quant_method": "awq", "bits": 4}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes (4-bit)"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "NVIDIA ModelOpt (NVFP4)"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}, "compressed-tensors"),
])
def test_other_quantized_sources_are_refused_naming_the_method(tmp_path, qc, needle):
    import shutil

    from .conftest import hybrid_case

    src = tmp_path / "q"
    shutil.copytree(hybrid_case("qwen3_next-tiny"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        plan(resolve(str(src)))
    assert "quant_method 'fp8'" in str(err.value)


def test_dequantize_any_window_and_scale_dtypes(tmp_path):
    """safetensors_io.dequantize on arbitrary element windows of a 3-D FP8 weight
    (partial rows, whole rows, across the leading axis) with float32, bf16 and
    e8m0 scales equals the format's definition."""
    import torch
    from safetensors.torch import save_file

    from hybridconv.safetensors_io import BlockScale, dequantize, read_header

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 70, 50, generator=g)
    q, s = fp8_blocks(w)
    e8m0 = torch.randint(120, 134, s.shape, generator=g, dtype=torch.uint8)
    cases = {"f32": s, "bf16": s.to(torch.bfloat16), "e8m0": e8m0.view(torch.float8_e8m0fnu)}
    for kind, scale in cases.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({"w": q, "w_scale_inv": scale}, str(path))
        infos, _ = read_header(path)
        bs = BlockScale(infos["w_scale_inv"], BLOCK, tuple(q.shape), infos["w"].begin)
        sf = (2.0 ** (e8m0.float() - 127)) if kind == "e8m0" else scale.float()
        want = dequant_reference(q, sf).reshape(-1).numpy()
        raw = q.view(torch.uint8).reshape(-1).numpy()
        rng = np.random.default_rng(1)
        for first, n in [(0, raw.size), (0, 50), (17, 33), (49, 2), (3450, 200), (123, 5000)] + [
                tuple(sorted(rng.integers(0, raw.size, 2))) for _ in range(10)]:
            n = max(1, min(n, raw.size - first)) if (first, n) != (0, raw.size) else n
            got = dequantize(raw[first:first + n], "F8_E4M3", bs, first)
            assert np.array_equal(got, want[first:first + n]), (kind, first, n)
