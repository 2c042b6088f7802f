"""hybridconv's own MLX implementations, one module per ``model_type``.

Parameter names and layouts are identical to mlx-lm's, so one converted folder
serves both ``hybridconv.load`` and ``mlx_lm.load``.
"""
