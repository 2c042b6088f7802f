"""Learned scales and biases against the float model's outputs (as mlx-lm's DWQ,
"distilled weight quantization", learns them against the float model's logits),
block by block so that memory stays one block.

With a block's codes ``q`` fixed (GPTQ's or round-to-nearest's), every quantized
matrix is ``W = s ⊙ q + b`` per group. The scales and biases are learned as
``s = s₀(1 + δs)`` and ``b = b₀ + s₀ δb`` (dimensionless steps, one learning rate
fits every layer) by Adam, minimising the block's relative squared error
``‖B_q(x_q) − B_f(x_f)‖² / ‖B_f(x_f)‖²`` — the quantized block on the quantized
model's own input against the *float model's* output of the block, so a block
also corrects some of the error the blocks below it left. The learned values are
rounded to the output dtype, and kept only if the block's error on calibration
windows held back from the learning (the last quarter, at least one batch) is
lower than before; otherwise the block keeps its codes' original scales.
"""

from __future__ import annotations

import numpy as np

from .. import interrupt
from ..safetensors_io import from_float32, to_float32
from .gptq import unpack

LEARNING_RATE = 1e-3


def _split(n: int) -> tuple[list[int], list[int]]:
    if n < 2:
        return [0], [0]
    held = max(1, n // 4)
    return list(range(n - held)), list(range(n - held, n))


def learn_block(model, layer, mats, specs, parts, xq, x0s, yf, dtype: str, steps: int = 200, seed: int = 0) -> dict:
    """Tune the scales and biases of ``layer``'s quantized matrices in place
    (``parts[path] = (packed, scales, biases)``, updated when kept)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    train, held = _split(len(xq))
    consts, params = {}, {}
    for p, spec in specs.items():
        packed, sc, bi = parts[p]
        W = mats[p]["weight"]
        cols = int(W.shape[-1])
        lead = packed.shape[:-1]
        q = unpack(packed.reshape(-1, packed.shape[-1]), spec.bits, cols).astype(np.float32)
        consts[p] = (mx.array(q.reshape(*lead, cols // spec.group_size, spec.group_size)),
                     mx.array(sc), mx.array(bi), tuple(W.shape))
        params[p] = {"ds": mx.zeros(sc.shape), "db": mx.zeros(bi.shape)}

    def weights(ps):
        out = {}
        for p, (q, s0, b0, shape) in consts.items():
            s = s0 * (1 + ps[p]["ds"])
            b = b0 + s0 * ps[p]["db"]
            out[p] = (q * s[..., None] + b[..., None]).reshape(shape)
        return out

    def set_weights(ws):
        for p, w in ws.items():
            mats[p]["weight"] = w

    def loss_fn(ps, i):
        set_weights(weights(ps))
        y = model.call_layer(layer, xq[i], None, x0s[i]).astype(mx.float32)
        return mx.sum((y - yf[i]) ** 2) / mx.sum(yf[i] ** 2)

    def held_error(ws) -> float:
        set_weights(ws)
        num = den = 0.0
        for i in held:
            y = model.call_layer(layer, xq[i], None, x0s[i]).astype(mx.float32)
            num += float(mx.sum((y - yf[i]) ** 2).item())
            den += float(mx.sum(yf[i] ** 2).item())
        return float(np.sqrt(num / den)) if den else 0.0

    start = {p: mats[p]["weight"] for p in specs}
    before = held_error(start)
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    grad = mx.value_and_grad(loss_fn)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        interrupt.check()  # a safe point: between learning steps
        i = train[int(rng.integers(len(train)))]
        loss, g = grad(params, i)
        params = opt.apply_gradients(g, params)
        mx.eval(params, loss)
        losses.append(float(loss.item()))
    # the learned values as stored (rounded to the output dtype)
    rounded = {}
    for p, (q, s0, b0, shape) in consts.items():
        s = np.array(s0 * (1 + params[p]["ds"]))
        b = np.array(b0 + s0 * params[p]["db"])
        rounded[p] = (to_float32(from_float32(s, dtype), dtype), to_float32(from_float32(b, dtype), dtype))
    learned_ws = {p: (consts[p][0] * mx.array(s)[..., None] + mx.array(b)[..., None]).reshape(consts[p][3])
                  for p, (s, b) in rounded.items()}
    after = held_error(learned_ws)
    kept = after < before
    if kept:
        for p, (s, b) in rounded.items():
            parts[p] = (parts[p][0], s, b)
        set_weights(learned_ws)
    else:
        set_weights(start)
    mx.eval(layer.parameters())
    return {
        "steps": steps,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
        "held_out_error_before": before,
        "held_out_error_after": after,
        "kept": bool(kept),
    }
