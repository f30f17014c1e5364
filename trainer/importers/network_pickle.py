"""Reading an official StyleGAN2-ADA network pickle (network-snapshot-*.pkl) without running its code.

Such a file is a plain `pickle.dump` of {"G", "D", "G_ema", "augment_pipe", "training_set_kwargs",
...}. Each network is a "persistent" object: its pickle asks a reconstruct function to execute
the class's module source, which the file carries, and then fills the new object's __dict__.
Tensors are rebuilt by torch's rebuild functions from storages whose bytes are a nested
legacy torch.save stream.

`read_network_pickle` reads it with an unpickler that resolves only an explicit allow-list of
names, each mapped to a stand-in that builds data and nothing else: the persistent reconstruct
function records its metadata (the embedded source is never executed or even kept), storages
load through `torch.load(..., weights_only=True)`. Any other name stops the read at that
opcode, before anything it names is called, with one line naming it.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray as _multiarray  # numpy 2
except ImportError:
    from numpy.core import multiarray as _multiarray

from trainer.checkpoint import CheckpointError

NETWORKS = ("G", "D", "G_ema")  # what is taken from the pickle; augment_pipe and the rest are not


class PersistentObject:
    """A persistent network object as recorded in the pickle: its class name and its __dict__."""

    def __init__(self, meta: dict[str, Any]):
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("a persistent object without a state mapping")
        self.class_name = str(meta.get("class_name", "?"))
        self.state: dict[str, Any] = dict(meta["state"])  # module_src is dropped: never executed, never kept


class EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: the mapping, without attribute access."""


def _load_storage(data: bytes) -> Any:
    """A storage from its nested legacy torch.save bytes (what torch.storage._load_from_bytes reads)."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage that is not a byte string")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a storage payload that holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 less its hooks and metadata: a plain tensor view of `storage`,
    which must back it one element to one (no zero or negative strides, nothing past its end)."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor whose storage is a {type(storage).__name__}")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) for v in (*size, *stride))):
        raise pickle.UnpicklingError("a tensor with a malformed size or stride")
    elements = storage.size() if isinstance(storage, torch.TypedStorage) else storage.nbytes()
    numel = math.prod(size)
    reach = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) + 1 if numel else offset
    if offset < 0 or any(n < 0 for n in size) or any(st < 1 for n, st in zip(size, stride, strict=True) if n > 1) \
            or reach > elements:
        raise pickle.UnpicklingError(f"a tensor of size {size} and stride {stride} that its storage of "
                                     f"{elements} elements does not hold")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_parameter(_with_state): the tensor itself (no Parameter, hooks or state)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter whose data is a {type(data).__name__}")
    return data


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for bytes objects: (text, 'latin1') only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}, not the latin1 of pickled bytes")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # nn.Module's _non_persistent_buffers_set under pickle protocols < 4
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # the same under protocol 2 (Python 2 names)
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,  # bytes under protocol 2
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and numpy 2 spellings
    ALLOWED[(_module, "scalar")] = _multiarray.scalar  # numpy floats, e.g. the reference's weight gains
    ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct


class RefusedName(pickle.UnpicklingError):
    """The pickle names something outside the allow-list."""


class NetworkUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED names (to their stand-ins); refuses every other name and persistent id.

    What the tensors hold is bounded by the file: each storage payload is loaded once however often
    the pickle refers to it, and the tensors rebuilt hold at most `budget` bytes in all (a file
    keeps every byte of its tensors, so an honest one never comes near)."""

    def __init__(self, file: Any, budget: int):
        super().__init__(file)
        self.budget = budget
        self.storages: dict[int, tuple[bytes, Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = ALLOWED[(module, name)]
        except KeyError:
            raise RefusedName(f"{module}.{name}") from None
        if found is _load_storage:
            return self.load_storage
        if found is _rebuild_tensor:
            return self.rebuild_tensor
        return found

    def load_storage(self, data: bytes) -> Any:
        if id(data) not in self.storages:  # the bytes object is kept, so its id stays its own
            self.storages[id(data)] = (data, _load_storage(data))
        return self.storages[id(data)][1]

    def rebuild_tensor(self, storage: Any, offset: int, size: tuple, stride: tuple, *rest: Any) -> torch.Tensor:
        tensor = _rebuild_tensor(storage, offset, size, stride, *rest)
        self.budget -= tensor.numel() * tensor.element_size()
        if self.budget < 0:
            raise pickle.UnpicklingError("tensors holding more bytes than the file has")
        return tensor

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"a persistent id ({type(pid).__name__}), which network pickles do not use")


def load_network_pickle(path: str) -> dict[str, Any]:
    """The pickle's top-level mapping, its networks as PersistentObject records; CheckpointError
    (one line, naming the file) for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            data = NetworkUnpickler(f, budget=os.path.getsize(path)).load()
    except RefusedName as e:
        raise CheckpointError(f"{path}: refused: the pickle asks for {e}, which is not a tensor, container or "
                              f"StyleGAN2-ADA network record (nothing from the file was run)") from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many kinds
        why = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a readable StyleGAN2-ADA network pickle ({type(e).__name__}: {why})") from None
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), PersistentObject):
        held = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a StyleGAN2-ADA network pickle (expected a mapping with G_ema; "
                              f"it holds {held or 'nothing'})")
    return data


def state_dict(obj: PersistentObject, where: str) -> dict[str, torch.Tensor]:
    """The flat state dict of a recorded module: its _parameters and persistent _buffers, then its
    _modules' (dotted names, as nn.Module.state_dict gives them)."""
    out: dict[str, torch.Tensor] = {}
    todo, seen = [(obj, "")], set()
    while todo:  # depth first, in the order nn.Module.state_dict gives (no recursion: any depth is safe)
        node, prefix = todo.pop()
        if not isinstance(node, PersistentObject):
            raise CheckpointError(f"{where}: {prefix or 'the network'} is a {type(node).__name__}, not a "
                                  f"network record")
        if id(node) in seen:
            raise CheckpointError(f"{where}: {prefix} appears twice in the network (a cycle or a shared module)")
        seen.add(id(node))
        state = node.state
        skip = state.get("_non_persistent_buffers_set") or set()
        groups = [state.get(g) or {} for g in ("_parameters", "_buffers", "_modules")]
        if not all(isinstance(g, dict) for g in groups) or not isinstance(skip, (set, frozenset)):
            raise CheckpointError(f"{where}: {prefix or 'the network'} is not a module record (parameters, "
                                  f"buffers and submodules as mappings)")
        for group, entries in zip(("_parameters", "_buffers"), groups[:2], strict=True):
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{where}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                out[f"{prefix}{name}"] = value
        todo += [(child, f"{prefix}{name}.") for name, child in reversed(groups[2].items()) if child is not None]
    return out


def plain(value: Any) -> Any:
    """EasyDicts (and nested ones) as plain dicts, tuples and lists kept."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def read_network_pickle(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """(nets, init_kwargs) of an official StyleGAN2-ADA network pickle, read without running its code.

    nets: {"G", "D", "G_ema"} (those present) -> flat state dict in the reference's names;
    init_kwargs: the same keys -> the keyword arguments each network was constructed with."""
    data = load_network_pickle(path)
    nets, init_kwargs = {}, {}
    for name in NETWORKS:
        obj = data.get(name)
        if obj is None:
            continue
        if not isinstance(obj, PersistentObject):
            raise CheckpointError(f"{path}: {name} is a {type(obj).__name__}, not a network record")
        nets[name] = state_dict(obj, f"{path}: {name}")
        kwargs = obj.state.get("_init_kwargs")
        init_kwargs[name] = plain(kwargs) if isinstance(kwargs, dict) else {}
    return nets, init_kwargs
