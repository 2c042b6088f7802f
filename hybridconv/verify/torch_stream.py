"""The PyTorch reference one block at a time: verify's streamed path.

A model larger than the machine cannot be held whole, in PyTorch or in MLX; its
*blocks* can, one at a time. The reference then runs **layer-major**: the
transformers model is built without allocating its parameters (on PyTorch's
``meta`` device; buffers such as rotary tables are computed as usual), the
parameters outside the decoder blocks (embedding, final norm, head, blocks
shared between layers) are read, and then, for each block in turn, only that
block's tensors are read from the safetensors, every input sequence goes
through it, its outputs go to disk, and its parameters go back to ``meta``.
Memory: the largest block, the global parameters and one sequence's
activations, not the model.

**How one block runs standalone.** Calling a decoder layer by hand would need,
per architecture, its masks, rotary tables, multipliers, the embeddings that
Zamba2's shared blocks read again, the router state ZAYA carries beside the
residual, the block states Inkling-2 gathers in its loop... Instead the
model's *own* forward runs, with every earlier block replaced for that call by
a replay of its stored output (the exact output object: a tensor, or the tuple
the model's loop unpacks), and a hook on block ``i`` that records its output
and stops the forward right there. transformers thus computes everything a
block receives, for every architecture alike; the cost is the model's work
before its first block (embedding lookup, masks, rotary tables) once per
block and sequence, which is measured in the README ("Benchmark / Verify":
a few milliseconds, against the block's own seconds). The stored outputs are
memory-mapped, so a replay whose value the loop never reads is never read from
disk. The logits are the same forward with *every* block replayed: the model's
own final norm, head, soft cap and logit multipliers; an untied head larger than
:data:`HEAD_SLICE_BYTES` is never held whole: it is computed in vocabulary
slices, each read from the source when used. A model that calls one
block twice in a forward (a looped model) cannot run this way; it is refused
with that reason.

**Weights.** :func:`read_source_tensor` is the reference's one reader of
source weights: each tensor is read when transformers' loader materialises it
(one tensor of the source's dtype at a time beside the block in the reference
dtype). transformers' own loading code
(``core_model_loading.convert_and_load_state_dict_in_model``) renames and
converts them — fused experts, legacy names, ``keep_in_fp32`` dtypes — so a
block holds what ``from_pretrained`` would have given it; ties (the head to the
embedding, Zamba2's shared blocks to their first layer) are applied as it does,
and a tied parameter stays resident.

hybridconv's own PyTorch PLaMo-2 (:mod:`.torch_plamo2`) streams the same way
through :class:`Plamo2Blocks`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# --- the one reader of source weights -----------------------------------------------------


# An untied head larger than this (in the reference dtype) is read in vocabulary
# slices of this size when the logits are computed.
HEAD_SLICE_BYTES = 256 << 20


def read_source_tensor(info, rows: tuple[int, int] | None = None):
    """One source tensor (a :class:`hybridconv.safetensors_io.TensorInfo`), or its rows
    ``rows = (first, end)``, as a torch tensor of its stored dtype. Every weight the
    streamed reference (and hybridconv's PyTorch PLaMo-2) runs is read here: a
    dequantizing reader (FP8 block-scaled sources) plugs in at this one place."""
    import torch

    from ..safetensors_io import ITEMSIZE, read_float32

    if getattr(info, "scale", None) is not None:
        # an FP8 block-scaled weight (checkpoint.model_tensors attached its scales):
        # dequantized exactly as the conversion and the whole-model reference read it
        t = torch.from_numpy(read_float32(info))
        return t if rows is None else t[rows[0]:rows[1]]

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    if info.dtype not in dtypes:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype}, which the PyTorch reference "
                              "cannot read")
    width = ITEMSIZE[info.dtype]
    shape, begin, nbytes = list(info.shape), info.begin, info.nbytes
    if rows is not None:
        row = nbytes // max(1, shape[0])
        begin, nbytes = begin + rows[0] * row, (rows[1] - rows[0]) * row
        shape[0] = rows[1] - rows[0]
    # a writable buffer of the tensor's bytes, viewed (not copied) as torch
    buf = bytearray(nbytes)
    with open(info.file, "rb") as f:
        f.seek(begin)
        if f.readinto(buf) != nbytes:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' is truncated")
    raw = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    if width > 1 and nbytes:
        raw = raw.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[width])
    return raw.view(dtypes[info.dtype]).reshape(shape)


class _Lazy:
    """A source tensor that is read when transformers' loader indexes it (``t[...]``,
    as it does a safetensors slice)."""

    def __init__(self, info):
        self.info = info

    def __getitem__(self, key):
        return read_source_tensor(self.info)[key]


# --- building the model without its parameters -------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta():
    """Every ``nn.Parameter`` created inside goes to the ``meta`` device (no storage);
    buffers stay where they are computed (rotary tables, µP vectors, normalizers)."""
    import torch.nn as nn

    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Stop(Exception):
    """Raised by the hook on the block being run, once its output is recorded."""


class LoopedModelError(CheckpointError):
    pass


# --- block outputs on disk ---------------------------------------------------------------


class OutputStore:
    """Every block's output, per sequence, in ``folder``: the hidden states (the
    output's first tensor, what verify compares) in ``seq{S}-block{B}.npy`` —
    float32 or float16 as computed, bfloat16 as its bits in ``seq{S}-block{B}.bf16.npy``
    — and any other tensor of the output (a carried router state) beside it, with
    the output's structure kept in memory to rebuild it exactly."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.spec: dict[tuple[int, int], object] = {}
        self.hidden: dict[tuple[int, int], Path] = {}

    def _save(self, t, stem: str) -> Path:
        import torch

        t = t.detach()
        if t.dtype == torch.bfloat16:
            path = self.folder / f"{stem}.bf16.npy"
            np.save(path, t.contiguous().view(torch.int16).numpy())
        else:
            path = self.folder / f"{stem}.npy"
            np.save(path, t.contiguous().numpy())
        return path

    def put(self, seq: int, block: int, out) -> None:
        """Store block ``block``'s output for sequence ``seq`` (its batch row 0)."""
        import torch

        tensors: list = []

        def flat(x):
            if isinstance(x, torch.Tensor):
                tensors.append(x)
                return ("t", len(tensors) - 1)
            if isinstance(x, (tuple, list)):
                return (type(x), [flat(y) for y in x])
            return ("v", x)

        spec = flat(out)
        if not tensors:
            raise CheckpointError(f"the reference model's block {block} returned no tensor")
        paths = []
        for k, t in enumerate(tensors):
            stem = f"seq{seq}-block{block}" + ("" if k == 0 else f"-{k}")
            paths.append(self._save(t[0], stem))
        self.spec[seq, block] = (spec, paths)
        self.hidden[seq, block] = paths[0]

    @staticmethod
    def load(path: Path):
        """A stored tensor as torch, memory-mapped (copy-on-write: never read unless used)."""
        import torch

        arr = np.load(path, mmap_mode="c")
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if path.name.endswith(".bf16.npy") else t

    def get(self, seq: int, block: int):
        """Block ``block``'s output for sequence ``seq``, rebuilt (batch of 1)."""
        spec, paths = self.spec[seq, block]

        def build(x):
            if x[0] == "t":
                return self.load(paths[x[1]])[None]
            if x[0] == "v":
                return x[1]
            return x[0](build(y) for y in x[1])

        return build(spec)


def hidden_array(path: Path) -> np.ndarray:
    """A stored hidden state as float32 numpy (memory-mapped when stored in float32)."""
    arr = np.load(path, mmap_mode="r")
    if arr.ndim > 2:
        # several residual streams ([T, streams, H], hyper-connections): one
        # [T, streams·H] row per token, as the whole-model hook and hybridconv's blocks give them
        arr = arr.reshape(arr.shape[0], -1)
    if str(path).endswith(".bf16.npy"):
        return (np.asarray(arr).astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return arr if arr.dtype == np.float32 else np.asarray(arr, dtype=np.float32)


# --- transformers models, block by block ---------------------------------------------------


class TransformersBlocks:
    """A transformers causal LM run block by block (module docstring)."""

    def __init__(self, source, index, tdtype, n_layers: int, trust_remote_code: bool = False, config=None):
        import torch
        from transformers import AutoConfig
        from transformers import initialization as tinit

        from .torch_source import auto_class, decoder_layers

        self.torch = torch
        self.index = index
        self.tdtype = tdtype
        if config is None:
            config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        with _parameters_on_meta(), tinit.no_init_weights(), tinit.no_tie_weights():
            model = auto_class(config).from_config(config, dtype=tdtype, trust_remote_code=trust_remote_code)
        model.eval()
        self.model = model
        self.layers = decoder_layers(model, n_layers)
        self.n = n_layers
        self.prefix = next(name for name, m in model.named_modules() if m is self.layers)
        self.label = f"transformers {type(model).__name__}" + (" (remote code)" if trust_remote_code else "")
        self._setup_loading()
        self._group_tensors()
        # time in block forwards, and inside the blocks themselves: the difference is
        # what running the model's own forward per block costs (embedding, masks, ...)
        self.forward_seconds = 0.0
        self.block_seconds = 0.0

    # how transformers loads (its renamings, converters, dtype plan)
    def _setup_loading(self):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.modeling_utils import LoadStateDictConfig

        mapping = get_model_conversion_mapping(self.model, None, None)
        self._renamings = [e for e in mapping if isinstance(e, WeightRenaming)]
        self._converters = [e for e in mapping if isinstance(e, WeightConverter)]
        self._load_config = LoadStateDictConfig(
            dtype=self.tdtype, dtype_plan=self.model._get_dtype_plan(self.tdtype), weight_mapping=mapping,
        )
        try:
            self._tied = dict(self.model.get_expanded_tied_weights_keys(all_submodels=True))
        except AttributeError:  # a remote-code model without transformers 5's tie mapping
            self._tied = {}

    def _group_of(self, param: str):
        head = self.prefix + "."
        if param.startswith(head):
            return int(param[len(head):].split(".")[0])
        return None

    def _group_tensors(self):
        """Source tensors by the block whose parameters they fill (None: global)."""
        from transformers.core_model_loading import rename_source_key

        model = self.model
        meta = model.state_dict()
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        # a tie between two groups (the head and the embedding; a block shared by
        # layers) keeps both ends resident
        shared = set()
        for target, src in self._tied.items():
            if self._group_of(target) != self._group_of(src):
                shared.update((target, src))
        self.groups: dict[int | None, list[str]] = {None: []}
        self.params: dict[int | None, set[str]] = {None: set()}
        for name in params:
            g = None if name in shared else self._group_of(name)
            self.params.setdefault(g, set()).add(name)
        self.head = None  # (parameter name, source tensor) of a head read in vocabulary slices
        head_param = self._head_parameter(shared)
        for key in self.index.tensors:
            target, pattern = rename_source_key(key, self._renamings, self._converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                continue  # not a parameter of the model (from_pretrained ignores it too)
            if target == head_param and pattern is None:
                self.head = (target, self.index.tensors[key])
                self.params[None].discard(target)
                continue
            g = None if target in shared else self._group_of(target)
            self.groups.setdefault(g, []).append(key)

    def _head_parameter(self, shared) -> str | None:
        """The untied output projection's weight when it is large (more than
        :data:`HEAD_SLICE_BYTES` in the reference dtype): it is read in vocabulary
        slices when the logits are computed, never whole."""
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        w = getattr(out, "weight", None)
        if w is None or type(out).forward is not self.torch.nn.Linear.forward:
            return None
        name = next((n for n, p in self.model.named_parameters(remove_duplicate=False) if p is w), None)
        if name is None or name in shared or self._group_of(name) is not None:
            return None
        return name if w.numel() * w.element_size() > HEAD_SLICE_BYTES else None

    def block_bytes(self) -> dict:
        """Source bytes per group (None: the global parameters)."""
        return {g: sum(self.index.tensors[k].nbytes for k in keys) for g, keys in self.groups.items()}

    def _load(self, group) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        keys = self.groups.get(group, [])
        state = {k: _Lazy(self.index.tensors[k]) for k in keys}
        info, _ = convert_and_load_state_dict_in_model(self.model, state, self._load_config)
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys)[0]
            raise CheckpointError(f"tensor for the reference's parameter '{name}' has shape {list(got)}, "
                                  f"the model expects {list(want)}")
        self._tie()
        missing = sorted(n for n in self.params.get(group, ()) if self.model.get_parameter(n).is_meta)
        if missing:
            where = "the global parameters" if group is None else f"block {group}"
            raise CheckpointError(
                f"the checkpoint has no tensor for the reference model's parameter '{missing[0]}' ({where}"
                + (f", and {len(missing) - 1} more" if len(missing) > 1 else "") + ")",
                "the checkpoint is incomplete, or its names differ from what transformers' loader reads",
            )

    def _tie(self) -> None:
        """Tie parameters as from_pretrained does: the missing end becomes the loaded one."""
        model = self.model
        for target, src in self._tied.items():
            try:
                t, s = model.get_parameter(target), model.get_parameter(src)
            except AttributeError:
                continue
            if t is s:
                continue
            if t.is_meta and not s.is_meta:
                self._set(target, s)
            elif s.is_meta and not t.is_meta:
                self._set(src, t)

    def _set(self, name: str, value) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, value)

    def load_globals(self) -> None:
        self._load(None)

    def load_block(self, b: int) -> None:
        self._load(b)

    def release_block(self, b: int) -> None:
        """Its parameters back to ``meta`` (their storage freed); shared ones stay."""
        nn = self.torch.nn
        for name in self.params.get(b, ()):
            p = self.model.get_parameter(name)
            if not p.is_meta:
                self._set(name, nn.Parameter(p.to("meta"), requires_grad=False))

    def _forward(self, ids, replayed: int, store: OutputStore, seq: int, hook_block: int | None):
        """The model's forward on ``ids`` with blocks ``0 .. replayed - 1`` replaying
        their stored outputs for ``seq``; with ``hook_block``, stopped right after that
        block (its output returned), else the logits."""
        torch = self.torch
        calls = [0] * self.n
        captured: list = []

        def replay(j):
            def forward(*_args, **_kwargs):
                calls[j] += 1
                if calls[j] > 1:
                    raise LoopedModelError(
                        f"the reference model calls block {j} more than once in one forward (a looped model): "
                        "it cannot run one block at a time",
                        "use --no-stream (the whole model in memory)",
                    )
                return store.get(seq, j)
            return forward

        started: list = []

        def pre_hook(_module, _inputs):
            started.append(time.perf_counter())

        def hook(_module, _inputs, output):
            self.block_seconds += time.perf_counter() - started[0]
            captured.append(output)
            raise _Stop

        handles = []
        for j in range(replayed):
            self.layers[j].forward = replay(j)
        t0 = time.perf_counter()
        try:
            if hook_block is not None:
                handles = [self.layers[hook_block].register_forward_pre_hook(pre_hook),
                           self.layers[hook_block].register_forward_hook(hook)]
            with torch.no_grad():
                try:
                    out = self.model(torch.tensor(ids[None], dtype=torch.long), use_cache=False)
                except _Stop:
                    return captured[0]
                except (NotImplementedError, RuntimeError) as exc:
                    if "meta" not in str(exc):
                        raise
                    # the forward used a parameter that is not resident (on meta)
                    raise CheckpointError(
                        f"the reference model's forward uses parameters outside block {hook_block} and the global "
                        f"ones, so it cannot run one block at a time ({type(exc).__name__}: {str(exc)[:200]})",
                        "use --no-stream (the whole model in memory)",
                    ) from None
        finally:
            if handles:
                self.forward_seconds += time.perf_counter() - t0
            for h in handles:
                h.remove()
            for j in range(replayed):
                del self.layers[j].forward
        if hook_block is not None:
            raise CheckpointError(f"the reference model's forward did not call block {hook_block}")
        return out.logits

    def run_block(self, b: int, seq: int, ids: np.ndarray, store: OutputStore) -> None:
        store.put(seq, b, self._forward(ids, b, store, seq, b))

    def logits(self, seq: int, ids: np.ndarray, store: OutputStore):
        if self.head is None:
            return self._forward(ids, self.n, store, seq, None)
        out = self.model.get_output_embeddings()
        out.forward = self._sliced_head(out)
        try:
            return self._forward(ids, self.n, store, seq, None)
        finally:
            del out.forward

    def _sliced_head(self, module):
        """``module``'s forward (a Linear head) computed in vocabulary slices whose
        weights are read from the source one slice at a time (``HEAD_SLICE_BYTES`` each)."""
        torch = self.torch
        name, info = self.head
        vocab, width = info.shape
        rows = max(1, HEAD_SLICE_BYTES // max(1, width * 4))
        bias = module.bias

        def forward(x):
            parts = []
            for lo in range(0, vocab, rows):
                w = read_source_tensor(info, rows=(lo, min(vocab, lo + rows))).to(self.tdtype)
                parts.append(torch.nn.functional.linear(x, w, None if bias is None else bias[lo : lo + len(w)]))
            return torch.cat(parts, dim=-1)

        return forward


class Plamo2Blocks:
    """hybridconv's PyTorch PLaMo-2 (:mod:`.torch_plamo2`), block by block: the
    embedding, each layer on the stored output of the previous one, the head."""

    def __init__(self, source, index, tdtype):
        from .torch_plamo2 import TorchPlamo2

        self.model = TorchPlamo2(source.path, tdtype, stream=True, index=index)
        self.n = self.model.n_layers

    def block_bytes(self) -> dict:
        return self.model.block_bytes()

    def load_globals(self) -> None:
        self.model.load_globals()

    def load_block(self, b: int) -> None:
        self.model.load_layer(b)

    def release_block(self, b: int) -> None:
        self.model.release_layer(b)

    def run_block(self, b: int, seq: int, ids: np.ndarray, store: OutputStore) -> None:
        torch = __import__("torch")
        with torch.no_grad():
            x = self.model.embed(torch.tensor(ids[None], dtype=torch.long)) if b == 0 else store.get(seq, b - 1)
            store.put(seq, b, self.model.layer(b, x))

    def logits(self, seq: int, ids: np.ndarray, store: OutputStore):
        torch = __import__("torch")
        with torch.no_grad():
            return self.model.head(store.get(seq, self.n - 1))
