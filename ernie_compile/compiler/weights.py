"""Weights without a model: a checkpoint (or a preset) read one tensor at a time, in transformers' names.

Building the transformers model in float32 and copying its state dict costs ~17 bytes of RAM per
parameter, so ERNIE-4.5-21B-A3B (21.8 B parameters) cannot compile on a 24 GiB machine. The compile
instead captures a weightless model (`meta_model`: transformers' own class on the meta device) and
asks a `WeightSource` for each artifact weight as it writes it. A source speaks the names and shapes
of transformers' state dict; `get(name, index=e)` reads one expert of a stacked MoE tensor and only
that expert's checkpoint tensors, so the peak is one expert, not 64.

Baidu's checkpoints store experts one tensor each (`mlp.experts.{e}.gate_proj.weight`, `up_proj`,
`down_proj`); transformers' Ernie4_5_MoeForCausalLM holds them stacked (`mlp.experts.gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]). `CheckpointSource` does not restate that mapping: it asks
transformers for the conversions its from_pretrained applies to this model
(conversion_mapping.get_model_conversion_mapping), renames every checkpoint key with transformers'
own `rename_source_key`, and builds each tensor with the converter's own operations (MergeModulelist,
Concatenate, …). The oracle in tests/compiler/test_weights_source.py is from_pretrained itself.
"""
from __future__ import annotations

import json
import math
import os
import struct
from copy import deepcopy
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InternalError, UserError

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype tag → the name `dtype()` reports; any other tag (integers, bool, fp8) is refused
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class Shard:
    """One safetensors file read with pread: the header is parsed and checked up front (a truncated
    or malformed file fails here, not midway through a compile), and a tensor, or rows of it, is read
    into fresh memory and converted to float32 alone. Nothing is memory-mapped, so what a compile
    holds is what it asked for, not every page of the shards it has touched."""

    _NUMPY = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
              "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0)) if size >= 8 else (None,)
            if n is None or 8 + n > size:
                raise ValueError(f"header runs past the end of the file ({size} bytes)")
            header = json.loads(os.pread(self._fd, n, 8))
            header.pop("__metadata__", None)
            self._data = 8 + n  # tensor offsets count from here
            for key, info in header.items():
                b, e = info["data_offsets"]
                width = np.dtype(self._NUMPY.get(info["dtype"], np.uint8)).itemsize
                if info["dtype"] in self._NUMPY and e - b != width * math.prod(info["shape"]):
                    raise ValueError(f"{key}: {e - b} bytes for shape {info['shape']} of {info['dtype']}")
                if not 0 <= b <= e <= size - self._data:
                    raise ValueError(f"{key}: data runs past the end of the file (truncated?)")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        self._header = header

    def keys(self) -> list[str]:
        return list(self._header)

    def dtype(self, key: str) -> str:
        return self._header[key]["dtype"]  # the safetensors tag: BF16, F16, F32, …

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """float32 copy of `key`, or of rows [start, stop) along its axis 0 (only those bytes are read)."""
        info = self._header[key]
        shape, raw = list(info["shape"]), np.dtype(self._NUMPY[info["dtype"]])
        begin, end = info["data_offsets"]
        if rows is not None:
            row_bytes = raw.itemsize * math.prod(shape[1:])
            begin, end, shape[0] = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes, rows[1] - rows[0]
        buf = np.empty(math.prod(shape), raw)
        if os.preadv(self._fd, [memoryview(buf).cast("B")], self._data + begin) != end - begin:
            raise UserError(f"{self.path}: short read of {key} (file changed or truncated?)")
        if info["dtype"] == "BF16":  # bfloat16 is the high half of a float32: widen by a shift, exactly
            wide = buf.astype(np.uint32)
            wide <<= 16
            return wide.view(np.float32).reshape(shape)
        return buf.astype(np.float32, copy=False).reshape(shape)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def meta_model(config):
    """Transformers' own causal-LM class for `config`, its parameters on the meta device (no memory),
    eval mode, float32, attention implementation chosen as its constructor chooses it. Non-persistent
    buffers (RoPE's inv_freq) are computed for real, as from_pretrained re-initialises them after its
    own meta-device construction: they are not in any checkpoint and the forward reads them."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from .load import SUPPORTED

    cls = getattr(transformers, SUPPORTED[config.model_type])
    with torch.device("meta"), no_init_weights():
        model = cls(config)
    owners = {name.rpartition(".")[0] for name, _ in model.named_non_persistent_buffers()}
    for owner in owners:
        module = model.get_submodule(owner)
        for leaf, buf in list(module.named_buffers(recurse=False)):
            module._buffers[leaf] = torch.empty_like(buf, device="cpu")
        model._init_weights(module)
    if any(b.is_meta for _, b in model.named_buffers()):
        raise InternalError(f"{cls.__name__}: a buffer is still on the meta device after re-initialisation")
    model.tie_weights()  # one lm_head/embedding parameter, as in a loaded model (and its captured graph)
    model.config.dtype = torch.float32  # what from_pretrained(dtype=torch.float32) records
    return model.eval()


def fake_parameters(model):
    """Make a meta_model exportable by the existing capture: every meta parameter (a tied pair once)
    becomes a FakeTensor that claims the CPU, and the returned FakeTensorMode is the one to run
    capture() under (`with fake_parameters(model): capture(model, …)`). Plain meta parameters fail
    there ("Tensor on device meta is not on the expected device cpu": the ids are CPU tensors); fake
    ones trace exactly as real ones, allocate nothing, and reach TVM's importer as DLPack views of a
    null pointer that nothing reads (lower.py drops the importer's "params" attribute)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # buffers (RoPE inv_freq) stay real tensors
    fakes: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in fakes:
                    fakes[id(p)] = torch.nn.Parameter(FakeTensor(mode, p.data, torch.device("cpu")),
                                                      requires_grad=p.requires_grad)
                module._parameters[leaf] = fakes[id(p)]
    return mode


class WeightSource:
    """The transformers state-dict view of some weights, produced on demand as float32 numpy arrays.

    Tied parameters (lm_head.weight when tie_word_embeddings) are not listed by `names()`: they are
    the same tensor as their source (model.embed_tokens.weight), which is listed; `get` and `shape`
    still answer for the tied name. `skipped` lists the checkpoint tensors transformers ignores."""

    def __init__(self, model):
        self.config = model.config
        self._meta = model  # a meta_model: names, shapes, and the module of each parameter
        self._shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}  # state-dict order
        self._tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # tied name → its source
        self.skipped: list[str] = []

    def names(self) -> list[str]:
        return [n for n in self._shapes if n not in self._tied]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._resolve(name)]

    def dtype(self, name: str) -> str:
        raise NotImplementedError

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        """float32 array of `name`; with `index`, slice `index` along axis 0 of a stacked tensor."""
        raise NotImplementedError

    def stacked(self, name: str) -> bool:
        """Whether `get(name, index=e)` reads only slice e (MoE expert tensors)."""
        return False

    def get_rows(self, name: str, first: int, end: int) -> np.ndarray:
        """float32 rows [first, end) along axis 0 of `name`, reading no more than the source must:
        the 300B's embedding is 3.4 GB in float32, its dense MLP matrices 0.9 GB each."""
        return np.ascontiguousarray(self.get(name)[first:end])

    def _resolve(self, name: str) -> str:
        name = self._tied.get(name, name)
        if name not in self._shapes:
            raise KeyError(f"{name!r} is not a transformers state-dict name of {type(self._meta).__name__}")
        return name

    def materialize(self, model) -> None:
        """Fill `model` (a meta_model of the same config) with real float32 tensors, one at a time,
        and tie what transformers ties: afterwards it equals from_pretrained(..., dtype=float32)."""
        import torch

        for name in self.names():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            value = torch.from_numpy(self.get(name))  # no copy: the array is already float32
            if leaf in module._parameters:
                old = module._parameters[leaf]
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = value
        model.tie_weights()
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise InternalError(f"materialize left {len(left)} parameters on meta: {left[:3]}")


class _Entry:
    """How one transformers tensor is made: the checkpoint keys it reads, per source pattern of its
    converter (in transformers' load order), and the converter (None: a plain rename)."""

    __slots__ = ("keys", "converter", "sliceable")

    def __init__(self, converter):
        self.converter = converter
        self.keys: dict[str, list[str]] = {}
        self.sliceable = converter is not None and _slices_along_axis0(converter.operations)


def _slices_along_axis0(operations) -> bool:
    """True when slice e of the converter's output depends only on element e of each input list:
    MergeModulelist(dim=0) stacks the per-expert tensors, and what follows joins along other axes."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    first, rest = operations[0], operations[1:]
    return (isinstance(first, MergeModulelist) and first.dim == 0
            and all(isinstance(op, Concatenate) and op.dim != 0 for op in rest))


class CheckpointSource(WeightSource):
    """A Hugging Face folder (config.json + *.safetensors, with or without an index) read lazily.

    Construction reads only the safetensors headers and checks everything a compile would otherwise
    discover late: shards named by the index, dtypes, every parameter present with the shape the
    model expects. Expert tensors are stacked by transformers' own converter operations, per call."""

    def __init__(self, folder: Path, model=None):
        """`model`: the folder's meta_model, when the caller has built it already."""
        if model is None:
            import transformers

            model = meta_model(transformers.AutoConfig.from_pretrained(folder))
        super().__init__(model)
        self.folder = Path(folder)
        self._shards = [Shard(f) for f in _shard_files(self.folder)]  # headers checked here
        self._where: dict[str, Shard] = {}  # checkpoint key → its shard
        self._stored: dict[str, tuple[str, tuple[int, ...]]] = {}  # checkpoint key → (dtype tag, shape)
        self._unbuildable: list[str] = []
        for shard in self._shards:
            for key in shard.keys():
                self._where[key], self._stored[key] = shard, (shard.dtype(key), shard.shape(key))
        self._entries, self._producer = self._plan()
        self._check()

    # -- plan: checkpoint keys → transformers names, the way from_pretrained renames them --------
    def _plan(self):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        model = self._meta
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix, meta_sd = model.base_model_prefix, self._shapes
        entries: dict[str, _Entry] = {}
        for key in sorted(self._where, key=dot_natural_key):  # transformers' order: experts 0, 1, …, 10
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if name not in meta_sd and key in meta_sd:  # as from_pretrained: keep a key that already fits
                name, pattern = rename_source_key(key, [], [], prefix, meta_sd)
            if name not in meta_sd:
                self.skipped.append(key)  # e.g. the MTP head (mtp_*): transformers does not load it
                continue
            entry = entries.setdefault(name, _Entry(by_pattern[pattern] if pattern else None))
            entry.keys.setdefault(pattern or key, []).append(key)
        # which transformers names each entry yields (a split yields several): run it on meta tensors
        producer: dict[str, tuple[str, tuple[int, ...]]] = {}
        for first, entry in entries.items():
            try:
                built = self._build(first, entry, entry.keys, self._meta_read)
            except RuntimeError as e:  # parts that do not fit together (e.g. gate and up of different shapes)
                self._unbuildable.append(f"{first} ({str(e).splitlines()[0]})")
                continue
            producer.update({name: (first, tuple(t.shape)) for name, t in built.items()})
        return entries, producer

    def _check(self) -> None:
        bad_dtype = [k for e in self._entries.values() for ks in e.keys.values() for k in ks
                     if self._stored[k][0] not in FLOAT_DTYPES]
        if bad_dtype:
            k = bad_dtype[0]
            raise UserError(f"{self._where[k].path}: tensor {k} is {self._stored[k][0]}; weights must be float "
                            f"(bfloat16, float16, float32)")
        problems = self._unbuildable + [n for n in self.names() if n not in self._producer
                                        and not any(u.startswith(n + " ") for u in self._unbuildable)]
        problems += [f"{n} (checkpoint {list(s)}, model {list(self._shapes[n])})"
                     for n, (_, s) in self._producer.items() if n in self._shapes and s != self._shapes[n]]
        if problems:
            raise UserError(f"{self.folder}: weights missing or of the wrong shape: {', '.join(problems[:5])}"
                            + (" …" if len(problems) > 5 else ""))

    # -- reading ----------------------------------------------------------------------------------
    def _read(self, key: str, rows: tuple[int, int] | None = None):
        """One checkpoint tensor (or rows of it) as float32 torch, cast per tensor as from_pretrained does."""
        import torch

        return torch.from_numpy(self._where[key].read(key, rows))

    def _meta_read(self, key: str):
        import torch

        return torch.empty(self._stored[key][1], dtype=torch.float32, device="meta")

    def _build(self, first: str, entry: _Entry, keys: dict[str, list[str]], read) -> dict:
        """Run the entry's converter (a fresh copy, as from_pretrained makes one per target) over
        `keys`; returns transformers name → torch tensor."""
        if entry.converter is None:
            key = keys[next(iter(keys))][0]  # a rename reads one tensor
            return {first: read(key)}
        conv = deepcopy(entry.converter)
        for pattern, ks in keys.items():
            for k in ks:
                conv.add_tensor(first, k, pattern, partial(read, k))
        out = conv.convert(first, model=self._meta, config=self.config)
        return {n: (t[0] if isinstance(t, list) else t) for n, t in out.items()}

    def dtype(self, name: str) -> str:
        first = self._producer[self._resolve(name)][0]
        tags = {self._stored[k][0] for ks in self._entries[first].keys.values() for k in ks}
        return FLOAT_DTYPES[max(tags, key=list(FLOAT_DTYPES).index)]  # mixed: the widest

    def stacked(self, name: str) -> bool:
        first = self._producer[self._resolve(name)][0]
        entry = self._entries[first]
        return entry.sliceable or (entry.converter is None and len(self.shape(name)) == 3)

    def get_rows(self, name: str, first: int, end: int) -> np.ndarray:
        entry = self._entries[self._producer[self._resolve(name)][0]]
        if entry.converter is None:  # stored as transformers takes it: read only those rows
            return self._read(entry.keys[next(iter(entry.keys))][0], (first, end)).numpy()
        return super().get_rows(name, first, end)

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        name = self._resolve(name)
        first = self._producer[name][0]
        entry = self._entries[first]
        if index is not None and not 0 <= index < self._shapes[name][0]:
            raise IndexError(f"{name}: index {index} outside [0, {self._shapes[name][0]})")
        if index is not None and entry.converter is None:  # already stacked on disk: read its rows
            key = entry.keys[next(iter(entry.keys))][0]
            return self._read(key, (index, index + 1))[0].numpy()
        if index is not None and entry.sliceable:  # element `index` of every per-expert list
            one = {p: [ks[index]] for p, ks in entry.keys.items()}
            return self._build(first, entry, one, self._read)[name][0].numpy()  # [1, …] → […]
        value = self._build(first, entry, entry.keys, self._read)[name].numpy()
        return value if index is None else np.ascontiguousarray(value[index])


def _shard_files(folder: Path) -> list[Path]:
    """The shards to read: those the index names (all must exist), else every *.safetensors."""
    index = folder / INDEX_FILE
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder}: no *.safetensors weight files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a valid safetensors index ({e})") from None
    files = [folder / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder}: shard {missing[0]} is named in {INDEX_FILE} but missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files
