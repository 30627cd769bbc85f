"""HTTP/2 cores behind the relay: libnghttp2 through cffi (ABI mode), with h2 as fallback.

:func:`select_core` says which one this process can run and why;
:class:`NgHttp2Connection` is the nghttp2 core, a drop-in for the ``h2.H2Connection``
methods and events the relay uses (see :mod:`gateway.h2core._conn`).
"""

from ._conn import NgHttp2Connection as NgHttp2Connection, from_limits as from_limits
from ._errors import (
    CoreInternalError as CoreInternalError,
    CoreLoadError as CoreLoadError,
    SessionFlooded as SessionFlooded,
    SessionInitError as SessionInitError,
    SessionTerminated as SessionTerminated,
)
from ._ffi import Library as Library, load as load_library
from ._select import CORES as CORES, CoreInfo as CoreInfo, select_core as select_core

__all__ = [
    "CORES", "CoreInfo", "CoreInternalError", "CoreLoadError", "Library", "NgHttp2Connection",
    "SessionFlooded", "SessionInitError", "SessionTerminated", "from_limits", "load_library",
    "select_core",
]
