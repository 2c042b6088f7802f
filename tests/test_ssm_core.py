"""The shared state-space core (hybridconv/models/ssm.py) against plain
per-step recurrences written here in numpy, and against transformers' own
gated norm and Mamba-2 chunk scan."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.models import ssm


def softplus(x):
    return np.log1p(np.exp(x))


def ssd_reference(x, dt, A, B, C, D, h0):
    """Mamba-2 one step at a time (float64)."""
    b, T, H, P = x.shape
    G = B.shape[2]
    R = H // G
    h = np.zeros((b, H, P, B.shape[-1])) if h0 is None else h0.astype(np.float64).copy()
    ys = np.zeros((b, T, H, P))
    for t in range(T):
        for hd in range(H):
            g = hd // R
            decay = np.exp(dt[:, t, hd] * A[hd])[:, None, None]
            h[:, hd] = decay * h[:, hd] + dt[:, t, hd, None, None] * x[:, t, hd, :, None] * B[:, t, g, None, :]
            ys[:, t, hd] = np.einsum("bpn,bn->bp", h[:, hd], C[:, t, g])
    if D is not None:
        ys = ys + x * D[:, None]
    return ys, h


def selective_reference(x, dt, A, B, C, D, h0):
    """Mamba-1 one step at a time (float64)."""
    b, T, Dch = x.shape
    h = np.zeros((b, Dch, A.shape[1])) if h0 is None else h0.astype(np.float64).copy()
    ys = np.zeros((b, T, Dch))
    for t in range(T):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
    if D is not None:
        ys = ys + x * D
    return ys, h


def ssd_inputs(rng, b=2, T=37, H=4, P=3, G=2, N=5, tiny_dt=False):
    x = rng.normal(size=(b, T, H, P)).astype(np.float32)
    dt = softplus(rng.normal(size=(b, T, H)) - (9 if tiny_dt else 1)).astype(np.float32)
    A = -np.exp(rng.normal(size=(H,))).astype(np.float32)
    B = rng.normal(size=(b, T, G, N)).astype(np.float32)
    C = rng.normal(size=(b, T, G, N)).astype(np.float32)
    D = rng.normal(size=(H,)).astype(np.float32)
    h0 = rng.normal(size=(b, H, P, N)).astype(np.float32)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_scan_matches_recurrence(chunk, G, with_state):
    rng = np.random.default_rng(chunk * 10 + G)
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, G=G)
    h0 = h0 if with_state else None
    y, h = ssm.ssd_scan(*map(mx.array, (x, dt, A, B, C, D)), None if h0 is None else mx.array(h0), chunk)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, D, h0)
    assert y.dtype == mx.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.array(y), y_ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(h), h_ref, atol=2e-4, rtol=2e-4)


def test_ssd_scan_tiny_time_steps_and_no_D():
    rng = np.random.default_rng(7)
    x, dt, A, B, C, _, h0 = ssd_inputs(rng, tiny_dt=True)
    assert dt.min() < 1e-3  # the regime a clip at 1e-3 would change
    y, h = ssm.ssd_scan(*map(mx.array, (x, dt, A, B, C)), None, mx.array(h0), 16)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, None, h0)
    np.testing.assert_allclose(np.array(y), y_ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(h), h_ref, atol=2e-4, rtol=2e-4)


def test_ssd_scan_prefill_equals_step_by_step():
    rng = np.random.default_rng(3)
    x, dt, A, B, C, D, _ = ssd_inputs(rng, T=21, G=2)
    args = [mx.array(v) for v in (x, dt, A, B, C, D)]
    y_full, h_full = ssm.ssd_scan(*args, None, 8)
    state, ys = None, []
    y0, state = ssm.ssd_scan(*[a[:, :10] if a.ndim > 1 else a for a in args], state, 8)
    ys.append(y0)
    for t in range(10, 21):
        yt, state = ssm.ssd_scan(*[a[:, t : t + 1] if a.ndim > 1 else a for a in args], state, 8)
        ys.append(yt)
    np.testing.assert_allclose(np.array(mx.concatenate(ys, axis=1)), np.array(y_full), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(state), np.array(h_full), atol=1e-5, rtol=1e-5)


def test_ssd_scan_one_group_three_dim_bc():
    rng = np.random.default_rng(4)
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, G=1)
    y3, h3 = ssm.ssd_scan(*map(mx.array, (x, dt, A, B[:, :, 0], C[:, :, 0], D, h0)), 8)
    y4, h4 = ssm.ssd_scan(*map(mx.array, (x, dt, A, B, C, D, h0)), 8)
    np.testing.assert_array_equal(np.array(y3), np.array(y4))


def test_ssd_scan_matches_transformers_chunk_scan():
    torch = pytest.importorskip("torch")
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    rng = np.random.default_rng(5)
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, T=29, G=2)
    raw_dt = np.log(np.expm1(dt.astype(np.float64))).astype(np.float32)  # softplus inverse
    t = lambda v: torch.from_numpy(np.ascontiguousarray(v))  # noqa: E731
    y_ref, h_ref = mamba2_chunk_scan(
        t(x), t(raw_dt), t(A), t(B), t(C), chunk_size=8, D=t(D), dt_softplus=True,
        initial_states=t(h0), return_final_states=True,
    )
    y, h = ssm.ssd_scan(*map(mx.array, (x, dt, A, B, C, D, h0)), 8)
    np.testing.assert_allclose(np.array(y), y_ref.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(h), h_ref.numpy(), atol=1e-4, rtol=1e-4)


def selective_inputs(rng, b=2, T=45, Dch=6, N=4):
    x = rng.normal(size=(b, T, Dch)).astype(np.float32)
    dt = softplus(rng.normal(size=(b, T, Dch)) - 1).astype(np.float32)
    A = -np.exp(rng.normal(size=(Dch, N))).astype(np.float32)
    B = rng.normal(size=(b, T, N)).astype(np.float32)
    C = rng.normal(size=(b, T, N)).astype(np.float32)
    D = rng.normal(size=(Dch,)).astype(np.float32)
    h0 = rng.normal(size=(b, Dch, N)).astype(np.float32)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_matches_recurrence(chunk, with_state):
    rng = np.random.default_rng(chunk)
    x, dt, A, B, C, D, h0 = selective_inputs(rng)
    h0 = h0 if with_state else None
    y, h = ssm.selective_scan(*map(mx.array, (x, dt, A, B, C, D)), None if h0 is None else mx.array(h0), chunk)
    y_ref, h_ref = selective_reference(x, dt, A, B, C, D, h0)
    np.testing.assert_allclose(np.array(y), y_ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(h), h_ref, atol=2e-4, rtol=2e-4)


def test_selective_scan_prefill_equals_step_by_step():
    rng = np.random.default_rng(11)
    x, dt, A, B, C, D, _ = selective_inputs(rng, T=20)
    args = [mx.array(v) for v in (x, dt, A, B, C, D)]
    sl = lambda a, s: a[:, s] if a.ndim == 3 else a  # noqa: E731
    y_full, h_full = ssm.selective_scan(*args, None)
    y0, state = ssm.selective_scan(*[sl(a, slice(0, 9)) for a in args], None)
    ys = [y0]
    for t in range(9, 20):
        yt, state = ssm.selective_scan(*[sl(a, slice(t, t + 1)) for a in args], state)
        ys.append(yt)
    np.testing.assert_allclose(np.array(mx.concatenate(ys, axis=1)), np.array(y_full), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(state), np.array(h_full), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [5, 64])
def test_selective_scan_per_group_bc(chunk):
    """B/C per group of channels (Zamba's multi-head Mamba-1) = each group scanned
    with its own B/C, from a carried state."""
    rng = np.random.default_rng(20 + chunk)
    G = 3
    x, dt, A, _, _, D, h0 = selective_inputs(rng, Dch=6)
    B = rng.normal(size=(2, 45, G, 4)).astype(np.float32)
    C = rng.normal(size=(2, 45, G, 4)).astype(np.float32)
    y, h = ssm.selective_scan(*map(mx.array, (x, dt, A, B, C, D, h0)), chunk)
    for g in range(G):
        c = slice(2 * g, 2 * g + 2)
        y_ref, h_ref = selective_reference(x[..., c], dt[..., c], A[c], B[:, :, g], C[:, :, g], D[c], h0[:, c])
        np.testing.assert_allclose(np.array(y[..., c]), y_ref, atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.array(h[:, c]), h_ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gated_rmsnorm_matches_transformers(groups):
    torch = pytest.importorskip("torch")
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated
    from transformers.models.mamba2 import modeling_mamba2

    # transformers 5.25 renamed MambaRMSNormGated to Mamba2RMSNormGated (same signature)
    MambaRMSNormGated = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated

    rng = np.random.default_rng(groups)
    dims = 16
    x = rng.normal(size=(2, 5, dims)).astype(np.float32)
    z = rng.normal(size=(2, 5, dims)).astype(np.float32)
    w = rng.normal(size=(dims,)).astype(np.float32)
    ref = MambaRMSNormGated(dims, dims // groups, eps=1e-5)
    ref.weight.data = torch.from_numpy(w)
    norm = ssm.GatedRMSNorm(dims, 1e-5, dims // groups)
    norm.weight = mx.array(w)
    want = ref(torch.from_numpy(x), torch.from_numpy(z)).detach().numpy()
    np.testing.assert_allclose(np.array(norm(mx.array(x), mx.array(z))), want, atol=1e-5, rtol=1e-5)
    for before in (False, True):
        ref2 = FalconH1RMSNormGated(dims, eps=1e-5, n_groups=groups, norm_before_gate=before)
        ref2.weight.data = torch.from_numpy(w)
        norm2 = ssm.GatedRMSNorm(dims, 1e-5, dims // groups, norm_before_gate=before)
        norm2.weight = mx.array(w)
        want = ref2(torch.from_numpy(x), torch.from_numpy(z)).detach().numpy()
        np.testing.assert_allclose(np.array(norm2(mx.array(x), mx.array(z))), want, atol=1e-5, rtol=1e-5)
    if groups > 1:  # the groups matter: a whole-vector norm is a different function
        whole = ssm.GatedRMSNorm(dims, 1e-5)
        whole.weight = mx.array(w)
        assert not np.allclose(np.array(whole(mx.array(x), mx.array(z))), np.array(norm(mx.array(x), mx.array(z))), atol=1e-3)


def test_segsum():
    a = mx.array(np.arange(1, 5, dtype=np.float32))
    s = np.array(ssm.segsum(a))
    assert s[3, 1] == 3 + 4 and s[2, 2] == 0 and math.isinf(s[1, 2]) and s[1, 2] < 0


def _copy_weights(torch_module, mlx_module):
    """Load a transformers mixer's parameters into an MLX mixer (conv1d
    kernels [C, 1, K] -> [C, K, 1])."""
    from mlx.utils import tree_unflatten

    weights = []
    for name, p in torch_module.state_dict().items():
        v = p.detach().float().numpy()
        if name == "conv1d.weight":
            v = v.transpose(0, 2, 1)
        if name.endswith("layernorm.weight") and "weighted" != getattr(mlx_module, "bcdt_norm", "weighted"):
            continue
        weights.append((name, mx.array(v)))
    mlx_module.update(tree_unflatten(weights))


def _perturb(module, seed):
    """Set every parameter from a seeded generator (the transformers mixers may
    be built without initialising them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "dt_proj.bias" or name == "dt_bias":
                p.copy_(noise - 2.0)  # softplus -> time steps around 0.1
            elif name == "A_log":
                p.copy_(noise * 0.5)
            else:
                p.copy_(noise * 0.3)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_mixer_matches_transformers(n_groups):
    torch = pytest.importorskip("torch")
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(hidden_size=16, num_heads=8, head_dim=4, expand=2, n_groups=n_groups, state_size=6,
                       conv_kernel=3, chunk_size=8, num_hidden_layers=1, use_conv_bias=True, use_bias=True)
    torch.manual_seed(0)
    ref = Mamba2Mixer(cfg, 0, initialize_mixer_weights=False).float().eval()
    _perturb(ref, n_groups)
    mix = ssm.Mamba2Mixer(16, 8, 4, n_groups, 6, 3, chunk_size=8, use_conv_bias=True, use_bias=True,
                          norm_eps=cfg.layer_norm_epsilon)
    _copy_weights(ref, mix)
    x = np.random.default_rng(0).normal(size=(2, 19, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(mix(mx.array(x))), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba"])
def test_mamba1_mixer_matches_transformers(kind):
    torch = pytest.importorskip("torch")
    if kind == "mamba":
        from transformers import MambaConfig as Cfg
        from transformers.models.mamba.modeling_mamba import MambaMixer as Ref
    else:
        from transformers import FalconMambaConfig as Cfg
        from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer as Ref

    cfg = Cfg(hidden_size=16, intermediate_size=24, state_size=5, conv_kernel=3, time_step_rank=3,
              num_hidden_layers=1, use_conv_bias=True, use_bias=True)
    torch.manual_seed(0)
    ref = Ref(cfg, 0, initialize_mixer_weights=False).float().eval()
    _perturb(ref, 1)
    mix = ssm.Mamba1Mixer(16, 24, 5, 3, 3, use_conv_bias=True, use_bias=True,
                          bcdt_norm="weightless" if kind == "falcon_mamba" else None,
                          bcdt_eps=getattr(cfg, "mixer_rms_eps", 1e-6))
    _copy_weights(ref, mix)
    x = np.random.default_rng(0).normal(size=(2, 70, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(mix(mx.array(x))), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mamba2", "mamba1"])
def test_mixer_prefill_equals_cached_decode(kind):
    from hybridconv.models.common import StateCache

    mx.random.seed(0)
    if kind == "mamba2":
        mix = ssm.Mamba2Mixer(16, 8, 4, 2, 6, 4, chunk_size=4)
    else:
        mix = ssm.Mamba1Mixer(16, 24, 5, 4, 3, bcdt_norm="weightless")
    x = mx.random.normal((1, 23, 16))
    full = mix(x)
    cache = StateCache()
    outs = [mix(x[:, :9], cache=cache)]
    for t in range(9, 23):
        outs.append(mix(x[:, t : t + 1], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), np.array(full), atol=1e-5, rtol=1e-5)
