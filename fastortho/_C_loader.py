"""The ``fastortho._C`` load lives in :mod:`fastortho.ops._load`; this name is that same module object
(so a test that patches ``fastortho._C_loader.C_DEVICE_TYPES`` patches what the op layer reads)."""
import sys

from fastortho.ops import _load

sys.modules[__name__] = _load
