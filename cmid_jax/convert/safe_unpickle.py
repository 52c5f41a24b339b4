"""`torch.load` of a trainer checkpoint without running anything the file pickles.

The official CMID trainer checkpoint pickles training objects besides its tensors (its metric
storage), so `torch.load(weights_only=True)` refuses it, and `weights_only=False` would import and
call whatever the file names: a crafted .pth runs its code. `load(path)` instead unpickles with a
restricted `find_class`: tensors (torch rebuilds their storages itself), dtypes, sizes, devices,
OrderedDicts and numpy scalars are admitted; any other class or function the file names, e.g.
`os.system` or the trainer's `MetricStorage`, is replaced by `Inert`, whose instances accept any
arguments, state and items and do nothing. Nothing is imported or called on the file's behalf.
"""

from __future__ import annotations

import collections
import importlib
import pickle
import types
from typing import Any


class Inert:
    """Stands in for a class or function a checkpoint names that is not admitted."""

    def __new__(cls, *args, **kwargs):
        del args, kwargs
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __call__(self, *args, **kwargs) -> Inert:
        return Inert()

    def __setstate__(self, state) -> None:
        del state

    def __setitem__(self, key, value) -> None:
        del key, value

    def append(self, item) -> None:
        del item

    def extend(self, items) -> None:
        del items


_ADMITTED_NUMPY = {
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'dtype'),
}
_TENSOR_REBUILDERS = ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_parameter')


def _admitted(torch, module: str, name: str) -> Any | None:
    """The object `module.name` if unpickling it only rebuilds data, else None."""
    if (module, name) == ('collections', 'OrderedDict'):
        return collections.OrderedDict
    if (module, name) == ('_codecs', 'encode'):  # How protocol 2 stores bytes (numpy scalars).
        import _codecs  # pylint: disable=import-outside-toplevel

        return _codecs.encode
    if module == 'torch._utils' and name in _TENSOR_REBUILDERS:
        return getattr(torch._utils, name)  # pylint: disable=protected-access
    if module == 'torch' and name in ('Size', 'device'):
        return getattr(torch, name)
    if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in _ADMITTED_NUMPY:  # numpy's own modules, by their fixed names.
        return getattr(importlib.import_module(module), name)
    return None


def load(path: str) -> tuple[Any, list[str]]:
    """(the unpickled checkpoint on the CPU, the sorted names replaced by `Inert`)."""
    import torch  # pylint: disable=import-outside-toplevel

    replaced: set[str] = set()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = _admitted(torch, module, name)
            if found is None:
                replaced.add(f'{module}.{name}')
                return Inert
            return found

    def load_one(file, **kwargs):  # torch's legacy format reads small headers with it.
        return RestrictedUnpickler(file, **kwargs).load()

    pickle_module = types.SimpleNamespace(
        Unpickler=RestrictedUnpickler, load=load_one, __name__='cmid_jax.convert.safe_unpickle'
    )
    obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=pickle_module)
    return obj, sorted(replaced)
