#!/usr/bin/env python
"""Load converted folders with hybridconv and with mlx_lm, run both on the same
tokens and print how far apart their logits are (part of `make demo`). mlx-lm
loads a folder as its users do: where the folder carries hybridconv's model
(config.json model_file), that file runs (trust_remote_code)."""

import sys
from pathlib import Path

import hybridconv  # first: loads the optimised BLAS before MLX (README, "Speed on Linux")
import mlx.core as mx
from mlx_lm.utils import load_model

for folder in sys.argv[1:]:
    ids = mx.array([[2, 17, 42, 99, 5, 8, 13, 21]], dtype=mx.int32)
    ours = hybridconv.load(folder)(ids).astype(mx.float32)
    theirs, config = load_model(Path(folder), trust_remote_code=True)
    ref = theirs(ids).astype(mx.float32)
    diff = mx.abs(ours - ref).max().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).astype(mx.float32).mean().item()
    code = f"its model file {config['model_file']}" if config.get("model_file") else "mlx-lm's own model"
    print(f"{folder}: logits {tuple(ours.shape)}, max |hybridconv - mlx_lm ({code})| = {diff:.2e}, "
          f"argmax agreement {agree:.0%}")
