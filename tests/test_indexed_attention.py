"""The shared cores of indexed attention and hyper-connections
(hybridconv.models.indexed_attention, .hyper_connections) against outside
references: torch.topk's choice under ties (every regime of its CPU kernel),
the block selection's mask, and the Sinkhorn / mHC mixing against
transformers' GLM-5.3-Flash module."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.models.hyper_connections import ManifoldHyperConnection
from hybridconv.models.indexed_attention import F32_MIN, selection_mask, topk_selection, torch_topk_set


def _rows(rng, count):
    """Tie-heavy rows: few distinct values, sometimes float32-min entries, all sizes
    (insertion sort < 4, introselect, its heap fallback, partial_sort at 64·k <= n)."""
    for _ in range(count):
        n = int(rng.choice([1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 130, 200, 700]))
        k = int(rng.integers(1, min(n, int(rng.choice([1, 2, 3, 8, n]))) + 1))
        vals = rng.integers(0, int(rng.choice([1, 2, 3, 6])) + 1, size=n).astype(np.float32)
        if rng.random() < 0.3:
            vals[rng.random(n) < 0.5] = F32_MIN
        yield vals, k


def test_torch_topk_set_is_torch_topk():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for vals, k in _rows(rng, 3000):
        want = sorted(torch.topk(torch.from_numpy(vals), k).indices.tolist())
        assert torch_topk_set(vals.tolist(), k) == want, (vals.tolist(), k)


def test_topk_selection_rows_and_prefixes():
    """Batched rows with their own prefix (candidates torch sees) and budget
    min(budget, prefix): the vectorised path and the replayed rows together are
    torch.topk row by row."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for n, budget in ((7, 2), (12, 3), (40, 4), (300, 2)):
        scores = rng.integers(0, 3, size=(3, 9, n)).astype(np.float32)
        scores[0] += rng.random((9, n)).astype(np.float32)  # a batch row without ties
        prefix = rng.integers(0, n + 1, size=(3, 9))
        got = np.array(topk_selection(mx.array(scores), mx.array(prefix), budget))
        for b in range(3):
            for t in range(9):
                p = int(prefix[b, t])
                want = np.zeros(n, bool)
                if p:
                    idx = torch.topk(torch.from_numpy(scores[b, t, :p]), min(budget, p)).indices.numpy()
                    want[idx] = True
                assert (got[b, t] == want).all(), (b, t)


def test_selection_mask():
    """Selected blocks of 3 plus each query's incomplete block, keys 0..S-1."""
    sel = mx.array([[[True, False], [False, True]]])  # queries at 6, 7; blocks 0 (0-2), 1 (3-5)
    m = np.array(selection_mask(sel, offset=6, T=2, S=8, c=3))[0, 0]
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 1, 0]
    assert m[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_manifold_hyper_connection_is_transformers():
    """mHC's pre/post/comb (Sinkhorn) and the merged streams against
    transformers' Glm5NextTextHyperConnection and decoder-layer arithmetic."""
    torch = pytest.importorskip("torch")
    from transformers import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextHyperConnection

    cfg = Glm5NextTextConfig(hidden_size=16, hc_mult=3, hc_sinkhorn_iters=7, hc_eps=1e-4, rms_norm_eps=1e-5,
                             num_hidden_layers=4)
    ref = Glm5NextTextHyperConnection(cfg).float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    h = torch.randn(2, 5, 3, 16, generator=g)
    y = torch.randn(2, 5, 16, generator=g)
    post, comb, x = ref(h)
    want = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)
    ours = ManifoldHyperConnection(16, 3, 1e-4, 1e-5, 7)
    ours.update({k: mx.array(v.detach().numpy()) for k, v in ref.state_dict().items()})
    hf = mx.array(h.reshape(2, 5, 48).numpy())
    gx, gpost, gcomb = ours(hf)
    assert np.abs(np.array(gx) - x.detach().numpy()).max() < 1e-5
    assert np.abs(np.array(gcomb) - comb.detach().numpy()).max() < 1e-6
    merged = np.array(ours.merge(hf, mx.array(y.numpy()), gpost, gcomb))
    assert np.abs(merged - want.reshape(2, 5, 48).detach().numpy()).max() < 1e-5
