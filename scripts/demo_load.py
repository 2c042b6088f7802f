#!/usr/bin/env python
"""Load converted folders with hybridconv and with mlx_lm, run both on the same
tokens and print how far apart their logits are (part of `make demo`)."""

import sys
from pathlib import Path

import hybridconv  # first: loads the optimised BLAS before MLX (README, "Speed on Linux")
import mlx.core as mx
from mlx_lm.utils import load_model

for folder in sys.argv[1:]:
    ids = mx.array([[2, 17, 42, 99, 5, 8, 13, 21]], dtype=mx.int32)
    ours = hybridconv.load(folder)(ids).astype(mx.float32)
    theirs, _ = load_model(Path(folder))
    ref = theirs(ids).astype(mx.float32)
    diff = mx.abs(ours - ref).max().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).astype(mx.float32).mean().item()
    print(f"{folder}: logits {tuple(ours.shape)}, max |hybridconv - mlx_lm| = {diff:.2e}, "
          f"argmax agreement {agree:.0%}")
