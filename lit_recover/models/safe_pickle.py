"""Read a ``torch.save`` file without running any code the file names.

A pickle is a small program: ``GLOBAL`` imports a name, ``REDUCE`` calls it, ``BUILD`` hands state to
``__setstate__``. ``torch.load(weights_only=False)`` runs that program as written, so a
``pruned_model.bin`` can execute anything, and it also breaks whenever a class it names has moved
(``LlamaSdpaAttention`` is gone in transformers 5; ``LLMPruner.*`` is rarely installed).

:class:`RestrictedUnpickler` resolves names through a fixed table instead of importing them:

- a short allowlist (plain containers, ``torch.Size``, dtypes, storage types and our own checked
  versions of torch's tensor/parameter rebuild functions) maps to real objects;
- every other name, whatever its module, becomes a :class:`PickledObject` subclass that only records
  what it is given. Calling it (``REDUCE``), instantiating it (``NEWOBJ``) or passing it state
  (``BUILD``) stores the arguments; nothing of the named class is imported or run. A pickled
  ``os.system("...")`` therefore reads back as an inert record of class ``os.system``.

Tensor data is read straight from the zip archive (``<archive>/data.pkl`` + ``<archive>/data/<key>``),
so ``torch.load`` and its TorchScript and legacy code paths are never entered. With ``mmap=True`` the
tensors are views of a copy-on-write memory map of the file instead of copies in process memory, as
``torch.load(mmap=True)`` gives them: the pages are read from the page cache when first touched, and
the processes of one machine that map the same file share them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import logging
import mmap as _mmap
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from lit_recover.errors import LitRecoverError

log = logging.getLogger(__name__)


class UnsafePickleError(LitRecoverError, ValueError):
    """The file is not a torch zip checkpoint this reader can take apart safely."""


class PickledObject:
    """An object a pickle described but that was never created: its class path and its state.

    Attributes:
        args: positional arguments the pickle passed to the class (``NEWOBJ``) or callable (``REDUCE``).
        kwargs: keyword arguments (``NEWOBJ_EX``), usually empty.
        state: what the pickle handed to ``__setstate__`` (``BUILD``): for most classes the
            instance ``__dict__``, sometimes ``(dict, slots)`` or an opaque value.
        items: values appended to it (list subclasses).
        dict_items: key/value pairs set on it (dict subclasses).
    """

    class_path: ClassVar[str] = "?"
    __slots__ = ("args", "kwargs", "state", "items", "dict_items")

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.dict_items = [], {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded everything; never forward to a real constructor

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # APPENDS / SETITEMS on list- and dict-like classes land here instead of in real methods.
    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def __call__(self, *args: Any, **kwargs: Any) -> PickledObject:
        # A pickle may REDUCE with a recorded object as the callable (e.g. after getattr); keep it inert.
        return record_type(f"{self.class_path}()")(self, *args, **kwargs)

    @property
    def attrs(self) -> dict[str, Any]:
        """The recorded instance attributes (``__dict__`` and slots), empty when there were none."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            merged: dict[str, Any] = {}
            for part in state:
                merged.update(part or {})
            return merged
        return state if isinstance(state, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        """A recorded attribute, or ``default``."""
        return self.attrs.get(name, default)

    def __repr__(self) -> str:
        return f"<pickled {self.class_path}>"


_RECORD_TYPES: dict[str, type[PickledObject]] = {}


def record_type(class_path: str) -> type[PickledObject]:
    """The (cached) inert stand-in type for the class or callable ``class_path``."""
    cls = _RECORD_TYPES.get(class_path)
    if cls is None:
        cls = type("PickledObject", (PickledObject,), {"class_path": class_path, "__slots__": ()})
        cls.__qualname__ = f"PickledObject[{class_path}]"
        _RECORD_TYPES[class_path] = cls
    return cls


def is_record(obj: Any, suffix: str = "") -> bool:
    """Whether ``obj`` is a :class:`PickledObject` whose class path ends with ``suffix``."""
    return isinstance(obj, PickledObject) and obj.class_path.endswith(suffix)


# --- the allowlist -------------------------------------------------------------------------------

class _Storage:
    """One storage of the archive: raw bytes already read, plus the dtype the pickle declared."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped, self.dtype = untyped, dtype


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. inside a persistent id: only its dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}

_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int for v in values):
        raise UnsafePickleError(f"tensor {what} is not a tuple of ints: {values!r:.80}")
    return tuple(values)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor data is a {type(storage).__name__}, not a storage of the archive")
    if type(offset) is not int:
        raise UnsafePickleError(f"tensor storage offset is not an int: {offset!r:.80}")
    t = torch.empty((0,), dtype=dtype or storage.dtype)
    # set_ checks the view against the storage size, so a forged size cannot read out of bounds.
    return t.set_(storage.untyped, offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # Hooks are never restored: they would be pickled callables.
    t = _tensor(storage, storage_offset, size, stride)
    if isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values()):
        torch._utils.set_tensor_metadata(t, metadata)  # conj/neg bits only
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() or t.is_complex() else t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError(f"tensor dtype is not a torch dtype: {dtype!r:.80}")
    t = _tensor(storage, storage_offset, size, stride, dtype)
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() or t.is_complex() else t


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter data is a {type(data).__name__}, not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))  # extra state is dropped: it may hold records


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses: keep the data as a plain tensor or Parameter, never construct the subclass.
    if func not in _TENSOR_BUILDERS or not isinstance(args, tuple):
        return record_type("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)
    data = func(*args)
    parameter = new_type is torch.nn.Parameter or (
        isinstance(new_type, type) and issubclass(new_type, PickledObject) and new_type.class_path.endswith("Parameter")
    )
    if parameter:
        return torch.nn.Parameter(data, data.requires_grad)
    return data


def _size(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (tuple, list))):
        raise UnsafePickleError(f"torch.Size of {args!r:.80}")
    return torch.Size(_ints(args[0], "size") if args else ())


def _device(*args):
    if not args or not all(isinstance(a, (str, int)) for a in args):
        raise UnsafePickleError(f"torch.device of {args!r:.80}")
    return torch.device(*args)


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); only plain text codecs are accepted
    # so that no codec module is looked up and imported on the file's behalf.
    codec = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(text, str) or codec not in {"latin1", "utf8", "ascii"}:
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode(encoding, errors)


def _bytearray(*args):
    if args and not isinstance(args[0], (bytes, str, list)):
        raise UnsafePickleError(f"bytearray of a {type(args[0]).__name__}")  # bytearray(n) would allocate n bytes
    return bytearray(*args)


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor(cls, object, None) is how protocol 0/1 pickles create instances.
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        return cls()
    if cls in (dict, list, set, collections.OrderedDict):
        return cls()
    raise UnsafePickleError(f"copyreg._reconstructor of {cls!r:.80}")


def _newobj(cls, *args):
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        return cls(*args)
    raise UnsafePickleError(f"copyreg.__newobj__ of {cls!r:.80}")


_TENSOR_BUILDERS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch.storage", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}
"""``(module, name)`` → the object the pickle gets. Everything else becomes a :class:`PickledObject` type."""


def _normalise(module: str, name: str) -> tuple[str, str]:
    # Protocol 2 pickles written by Python 3 name Python 2 modules (__builtin__, copy_reg).
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _target(stack: list[Any], allowed: tuple[type, ...], opcode: str) -> Any:
    target = stack[-1]
    if not isinstance(target, (PickledObject, *allowed)):
        raise UnsafePickleError(f"{opcode} on a {type(target).__name__} is not allowed")
    return target


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that imports nothing: allowlisted names or inert records.

    It is the pure-Python ``pickle`` unpickler (a model's ``data.pkl`` is small; the weights are
    separate) so that the opcodes which act on an object can be restricted too: ``BUILD`` (state)
    only reaches records, whose ``__setstate__`` just stores it, and ``APPEND``/``SETITEM``/``ADDITEMS`` only reach
    lists, dicts, sets and records. No allowlisted object ever has a method of its own called.

    Args:
        file: the pickle stream (``data.pkl`` of a torch archive).
        load_storage: called with ``(key, dtype, numel)`` for each persistent storage id; returns the
            storage's bytes as an ``UntypedStorage``.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, load_storage: Callable[[str, torch.dtype, int], torch.UntypedStorage]):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}
        self.recorded: set[str] = set()  # class paths that became records, for messages and tests

    def load_build(self) -> None:
        state = self.stack.pop()
        target = _target(self.stack, (dict, list, set), "BUILD")
        if isinstance(target, PickledObject):
            target.__setstate__(state)
        # a container's extra __dict__ (OrderedDict subclasses) is data we do not need: dropped

    def load_append(self) -> None:
        value = self.stack.pop()
        _target(self.stack, (list,), "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        _target(self.stack, (list,), "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        _target(self.stack, (dict,), "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = _target(self.stack, (dict,), "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        _target(self.stack, (set,), "ADDITEMS").update(items)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def find_class(self, module: str, name: str) -> Any:
        key = _normalise(module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        path = f"{key[0]}.{key[1]}"
        self.recorded.add(path)
        return record_type(path)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise UnsafePickleError(f"malformed storage reference {pid!r:.80}")
        if key not in self._storages:
            dtype = storage_type.dtype
            # Tensors that share a storage (views, tied weights) stay shared.
            self._storages[key] = _Storage(self._load_storage(key, dtype, numel), dtype)
        return self._storages[key]


def _archive_prefix(names: list[str]) -> str:
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise UnsafePickleError("no data.pkl in the archive: not a torch.save checkpoint")
    return pkl[0][: -len("data.pkl")]


def _member_offset(fh: Any, info: zipfile.ZipInfo) -> int | None:
    """Where the bytes of an uncompressed zip member start in the file; ``None`` for a compressed one."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise UnsafePickleError(f"{info.filename}: no local zip header where the directory says")
    name_len, extra_len = struct.unpack("<HH", header[26:30])  # the local header's own lengths
    return info.header_offset + 30 + name_len + extra_len


def safe_load(path: str | Path, *, mmap: bool = False) -> tuple[Any, set[str]]:
    """Read a ``torch.save`` zip checkpoint into tensors, plain containers and inert records.

    Args:
        path: the checkpoint file.
        mmap: give the tensors storage in a copy-on-write memory map of the file (nothing read
            until touched, pages shared by the processes that map the file, writes private to the
            process) instead of reading them into memory. Members that are stored compressed are
            read as usual.

    Returns:
        ``(object, recorded)``: the unpickled object tree and the class paths that became records.

    Raises:
        UnsafePickleError: the file is not a torch zip archive (e.g. the pre-1.6 legacy format), is a
            TorchScript archive, is big-endian, or its pickle is malformed.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafePickleError(
            "not a torch zip checkpoint (torch.save since torch 1.6); a legacy or non-torch file can only be "
            "read by trusting it (trust_pickle=True)"
        )
    mapped: _mmap.mmap | None = None
    if mmap and path.stat().st_size:
        with path.open("rb") as fh:
            # ACCESS_COPY: MAP_PRIVATE, as torch.load(mmap=True); writable views, the file never written
            mapped = _mmap.mmap(fh.fileno(), 0, access=_mmap.ACCESS_COPY)
    with zipfile.ZipFile(path) as zf, path.open("rb") as raw:
        names = zf.namelist()
        prefix = _archive_prefix(names)
        if f"{prefix}constants.pkl" in names:
            raise UnsafePickleError("a TorchScript archive, not a pickled model")
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise UnsafePickleError("saved on a big-endian machine; re-save it on a little-endian one")

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.UntypedStorage:
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise UnsafePickleError(f"storage {key} is missing from the archive") from None
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if numel < 0 or info.file_size != expected:
                raise UnsafePickleError(f"storage {key} holds {info.file_size} bytes, its reference says {expected}")
            if not expected:
                return torch.UntypedStorage(0)
            start = _member_offset(raw, info) if mapped is not None else None
            if start is not None:
                if start + expected > len(mapped):
                    raise UnsafePickleError(f"storage {key} runs past the end of the file")
                # a view of the map; the tensor keeps the map alive
                return torch.frombuffer(mapped, dtype=torch.uint8, count=expected, offset=start).untyped_storage()
            buf = bytearray(expected)
            with zf.open(info) as fh:
                if fh.readinto(buf) != expected:
                    raise UnsafePickleError(f"storage {key} is shorter than its entry says")
            # frombuffer shares memory with buf and keeps it alive: one copy of the weights in memory.
            return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()

        with zf.open(f"{prefix}data.pkl") as fh:
            unpickler = RestrictedUnpickler(io.BytesIO(fh.read()), load_storage)
            try:
                obj = unpickler.load()
            except UnsafePickleError:
                raise
            except Exception as exc:  # truncated or malformed pickle
                raise UnsafePickleError(f"malformed pickle ({type(exc).__name__}: {exc})") from exc
    log.debug("read %s; recorded classes: %s", path, sorted(unpickler.recorded))
    return obj, unpickler.recorded


def walk_records(obj: Any, _seen: set[int] | None = None) -> Iterator[PickledObject]:
    """Every :class:`PickledObject` reachable from ``obj`` (depth first, each once)."""
    seen = set() if _seen is None else _seen
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, PickledObject):
            yield item
            stack.extend([item.args, item.kwargs, item.state, item.items, item.dict_items])
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
