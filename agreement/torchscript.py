"""Read the tensors of a TorchScript archive (OpenAI's released CLIP ``.pt`` files) without running its code.

``torch.jit.load`` compiles and runs the archive's code (a module's ``__setstate__`` runs while loading), and
``torch.load(weights_only=True)`` refuses TorchScript archives. Here the archive's ``data.pkl`` is unpickled with a
restricted unpickler that knows only tensor storages, ``torch._utils._rebuild_tensor_v2``, ``OrderedDict`` and
TorchScript's list builders, and turns every scripted object (``__torch__.*``) into a plain container of its
attributes; any other global in the pickle is an error. Which attributes are parameters and buffers is read from
the class definitions under ``code/`` by parsing them (``ast``), never by executing them. The result is the state
dict that ``torch.jit.load(path).state_dict()`` gives.
"""

from __future__ import annotations

import ast
import io
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

# Legacy typed-storage names used in TorchScript pickles, and their dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class TorchScriptArchiveError(ValueError):
    """A TorchScript archive whose tensors cannot be read safely; the message names the file and the problem."""


class ScriptObject:
    """A scripted module or object of the archive, kept as its class name and its pickled attributes."""

    qualname = ""

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attributes = dict(state)
        else:  # a scripted ``__getstate__``: its value is kept, but holds no module attributes
            self.attributes = {"__state__": state}


def _script_class(qualname: str, cache: dict[str, type]) -> type:
    if qualname not in cache:
        cache[qualname] = type("ScriptObject", (ScriptObject,), {"qualname": qualname})
    return cache[qualname]


def _storage_marker(dtype: torch.dtype) -> tuple[str, torch.dtype]:
    return ("dtype", dtype)


def _rebuild_tensor(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """``torch._utils._rebuild_tensor_v2`` on the flat tensor that :meth:`_Unpickler.persistent_load` returns."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor is rebuilt from something that is not a storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped_storage(), storage_offset, size, stride)


def _identity_tag(value: Any, _type: Any = None) -> Any:
    return value


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_stringlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _identity_tag,
}


class _Unpickler(pickle.Unpickler):
    """Only tensors, plain Python values and containers for scripted objects; every other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}", self.classes)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _storage_marker(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which is not part of a weights archive (nothing was run)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, marker, key, _location, numel = pid
        if not (isinstance(marker, tuple) and marker[:1] == ("dtype",)):
            raise pickle.UnpicklingError(f"storage {key!r} has no known storage type")
        dtype = marker[1]
        key = str(key)
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(raw) < int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} is shorter than its {numel} elements")
            if numel:
                flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)[: int(numel) * itemsize]
                self.storages[key] = flat.view(dtype)
            else:
                self.storages[key] = torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a zip file laid out as a TorchScript archive (``<name>/data.pkl`` next to ``<name>/code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names)


def _class_members(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """``qualname -> parameter and buffer names`` from the ``__parameters__``/``__buffers__`` lines of ``code/``.

    The files are parsed with :mod:`ast` and only those two literal lists are read.
    """
    members: dict[str, set[str]] = {}
    code_prefix = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code_prefix) and name.endswith(".py")):
            continue
        module = name[len(code_prefix) : -3].replace("/", ".")
        try:
            tree = ast.parse(archive.read(name).decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            names: set[str] = set()
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and len(statement.targets) == 1
                    and isinstance(statement.targets[0], ast.Name)
                    and statement.targets[0].id in ("__parameters__", "__buffers__")
                ):
                    try:
                        value = ast.literal_eval(statement.value)
                    except ValueError:
                        continue
                    names.update(str(v) for v in value)
            members[f"{module}.{node.name}"] = names
    return members


def _flatten(
    obj: ScriptObject, members: dict[str, set[str]], prefix: str, out: dict[str, torch.Tensor]
) -> None:
    known = members.get(obj.qualname)
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, ScriptObject):
            _flatten(value, members, f"{prefix}{name}.", out)
        elif isinstance(value, torch.Tensor) and (known is None or name in known):
            out[f"{prefix}{name}"] = value


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without executing any of its code.

    Raises :class:`TorchScriptArchiveError` naming ``path`` when the archive holds anything but scripted modules,
    tensors and plain values.
    """
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise TorchScriptArchiveError(f"{source}: not a readable TorchScript archive ({error})") from None
    with archive:
        data_files = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data_files) != 1:
            raise TorchScriptArchiveError(f"{source}: not a TorchScript archive (no single <name>/data.pkl)")
        prefix = data_files[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order != sys.byteorder:
                raise TorchScriptArchiveError(
                    f"{source}: tensors stored {order}-endian; this machine is {sys.byteorder}"
                )
        unpickler = _Unpickler(archive.read(data_files[0]), archive, prefix, source)
        try:
            root = unpickler.load()
        except Exception as error:  # every failure of a hostile or broken file is reported alike
            raise TorchScriptArchiveError(
                f"{source}: cannot read the TorchScript archive safely: {error}"
            ) from None
        if not isinstance(root, ScriptObject):
            raise TorchScriptArchiveError(f"{source}: the TorchScript archive does not hold a module")
        state: dict[str, torch.Tensor] = {}
        _flatten(root, _class_members(archive, prefix), "", state)
    if not state:
        raise TorchScriptArchiveError(f"{source}: the TorchScript archive holds no tensors")
    return state
