"""libnghttp2 through cffi in ABI mode: the declarations we call, loading, feature probes.

ABI mode (``ffi.dlopen``) needs neither a compiler nor nghttp2's headers at install time:
the declarations below are copied by hand from ``nghttp2.h`` of nghttp2 1.52.0 (the
version Debian 12 ships), with two functions added that later releases introduced and
distributions backport with their security fixes.  Only the struct layouts we read are
declared, in the library's field order; :func:`load` checks the sizes that matter against
the running platform before anything is used.

Which protections the loaded library carries is probed symbol by symbol
(:class:`Library.protections`): a function missing from an old build raises
``AttributeError`` only when it is looked up, so every optional setter is fetched with
``getattr`` once here.
"""

from __future__ import annotations

import ctypes.util
import os
from dataclasses import dataclass, field
from typing import Any

from ._errors import CoreLoadError

# The soname the Debian/Ubuntu package libnghttp2-14 installs (curl depends on it).
SONAME = "libnghttp2.so.14"
# Older releases lack nghttp2_session_server_new2/mem_send semantics we rely on.
MIN_VERSION = (1, 40, 0)

CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  int age;
  int version_num;
  const char *version_str;
  const char *proto_str;
} nghttp2_info;

typedef struct {
  uint8_t *name;
  uint8_t *value;
  size_t namelen;
  size_t valuelen;
  uint8_t flags;
} nghttp2_nv;

typedef struct {
  size_t length;
  int32_t stream_id;
  uint8_t type;
  uint8_t flags;
  uint8_t reserved;
} nghttp2_frame_hd;

typedef union {
  int fd;
  void *ptr;
} nghttp2_data_source;

typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);

typedef struct {
  nghttp2_data_source source;
  nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef struct {
  int32_t stream_id;
  int32_t weight;
  uint8_t exclusive;
} nghttp2_priority_spec;

typedef struct {
  nghttp2_frame_hd hd;
  size_t padlen;
  nghttp2_priority_spec pri_spec;
  nghttp2_nv *nva;
  size_t nvlen;
  int cat;
} nghttp2_headers;

typedef struct {
  nghttp2_frame_hd hd;
  nghttp2_priority_spec pri_spec;
} nghttp2_priority;

typedef struct {
  nghttp2_frame_hd hd;
  uint32_t error_code;
} nghttp2_rst_stream;

typedef struct {
  int32_t settings_id;
  uint32_t value;
} nghttp2_settings_entry;

typedef struct {
  nghttp2_frame_hd hd;
  size_t niv;
  nghttp2_settings_entry *iv;
} nghttp2_settings;

typedef struct {
  nghttp2_frame_hd hd;
  uint8_t opaque_data[8];
} nghttp2_ping;

typedef struct {
  nghttp2_frame_hd hd;
  int32_t last_stream_id;
  uint32_t error_code;
  uint8_t *opaque_data;
  size_t opaque_data_len;
  uint8_t reserved;
} nghttp2_goaway;

typedef struct {
  nghttp2_frame_hd hd;
  int32_t window_size_increment;
  uint8_t reserved;
} nghttp2_window_update;

typedef union {
  nghttp2_frame_hd hd;
  nghttp2_headers headers;
  nghttp2_priority priority;
  nghttp2_rst_stream rst_stream;
  nghttp2_settings settings;
  nghttp2_ping ping;
  nghttp2_goaway goaway;
  nghttp2_window_update window_update;
} nghttp2_frame;

typedef int (*nghttp2_on_frame_recv_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_data_chunk_recv_callback)(
    nghttp2_session *session, uint8_t flags, int32_t stream_id, const char *data,
    size_t len, void *user_data);
typedef int (*nghttp2_on_stream_close_callback)(
    nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user_data);
typedef int (*nghttp2_on_begin_headers_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_header_callback)(
    nghttp2_session *session, const nghttp2_frame *frame, const char *name,
    size_t namelen, const char *value, size_t valuelen, uint8_t flags, void *user_data);
typedef ssize_t (*nghttp2_data_source_read_length_callback)(
    nghttp2_session *session, uint8_t frame_type, int32_t stream_id,
    int32_t session_remote_window_size, int32_t stream_remote_window_size,
    uint32_t remote_max_frame_size, void *user_data);

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_frame_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb);
void nghttp2_session_callbacks_set_on_begin_headers_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb);
void nghttp2_session_callbacks_set_on_header_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb);
void nghttp2_session_callbacks_set_data_source_read_length_callback(
    nghttp2_session_callbacks *cbs, nghttp2_data_source_read_length_callback cb);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val);
void nghttp2_option_set_no_http_messaging(nghttp2_option *option, int val);
void nghttp2_option_set_max_reserved_remote_streams(nghttp2_option *option, uint32_t val);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
                                                uint64_t rate);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);

int nghttp2_session_client_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data,
    const nghttp2_option *option);
int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data,
    const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);

ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);

int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *session,
                                                      int32_t stream_id);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session);
int32_t nghttp2_session_get_local_window_size(nghttp2_session *session);
int32_t nghttp2_session_get_stream_local_window_size(nghttp2_session *session,
                                                     int32_t stream_id);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id);
uint32_t nghttp2_session_get_local_settings(nghttp2_session *session, int id);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *session);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
size_t nghttp2_session_get_outbound_queue_size(nghttp2_session *session);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
                                          int32_t stream_id, int32_t window_size);

int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_consume_connection(nghttp2_session *session, size_t size);
int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code);

int32_t nghttp2_submit_headers(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva, size_t nvlen,
    void *stream_user_data);
int nghttp2_submit_data(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                        const nghttp2_data_provider *data_prd);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                              uint32_t error_code);
int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
                            const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags,
                        const char *opaque_data);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
                          uint32_t error_code, const char *opaque_data,
                          size_t opaque_data_len);
int nghttp2_submit_window_update(nghttp2_session *session, uint8_t flags,
                                 int32_t stream_id, int32_t window_size_increment);
"""

# Constants from nghttp2.h (stable ABI: they are part of the wire protocol or the API).
NGHTTP2_FLAG_NONE = 0
NGHTTP2_FLAG_END_STREAM = 0x01
NGHTTP2_FLAG_ACK = 0x01
NGHTTP2_FLAG_PRIORITY = 0x20
NGHTTP2_DATA_FLAG_EOF = 0x01
NGHTTP2_DATA_FLAG_NO_END_STREAM = 0x02
NGHTTP2_HCAT_REQUEST = 0
NGHTTP2_HCAT_RESPONSE = 1
NGHTTP2_HCAT_HEADERS = 3
NGHTTP2_ERR_INVALID_ARGUMENT = -501
NGHTTP2_ERR_DEFERRED = -508
NGHTTP2_ERR_STREAM_CLOSED = -510
NGHTTP2_ERR_STREAM_SHUT_WR = -512
NGHTTP2_ERR_INVALID_STREAM_STATE = -514
NGHTTP2_ERR_DATA_EXIST = -529
NGHTTP2_ERR_FLOW_CONTROL = -524
NGHTTP2_ERR_CALLBACK_FAILURE = -902
NGHTTP2_ERR_BAD_CLIENT_MAGIC = -903
NGHTTP2_ERR_FLOODED = -904
NGHTTP2_ERR_TOO_MANY_CONTINUATIONS = -905

# The optional option setters and what each one protects against.  Debian 12's
# 1.52.0-1+deb12u1 backports the first (CVE-2023-44487, "rapid reset") and deb12u2 the
# second (CVE-2024-28182, unbounded CONTINUATION frames); upstream added them in 1.57.0
# and 1.61.0.
OPTIONAL_SETTERS = {
    "stream_reset_rate_limit": "nghttp2_option_set_stream_reset_rate_limit",
    "max_continuations": "nghttp2_option_set_max_continuations",
}
# Setters every release since 1.40 has; listed so the report names them all.
BASE_SETTERS = {
    "max_outbound_ack": "nghttp2_option_set_max_outbound_ack",  # PING/SETTINGS ack flood
    "max_settings": "nghttp2_option_set_max_settings",  # entries in one SETTINGS frame
    "max_deflate_dynamic_table_size": "nghttp2_option_set_max_deflate_dynamic_table_size",
    "peer_max_concurrent_streams": "nghttp2_option_set_peer_max_concurrent_streams",
}


@dataclass(frozen=True)
class Library:
    """A loaded libnghttp2: the cffi handles, its version and the protections it has."""

    ffi: Any
    lib: Any
    path: str
    version: str
    version_num: int
    # name -> bool: which option setters of OPTIONAL_SETTERS/BASE_SETTERS it exports
    protections: dict[str, bool] = field(default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        n = self.version_num
        return (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF

    def setter(self, name: str) -> Any:
        """The option setter called ``name`` (a key of OPTIONAL_SETTERS), or None."""
        if not self.protections.get(name):
            return None
        return getattr(self.lib, OPTIONAL_SETTERS.get(name) or BASE_SETTERS[name])


_loaded: Library | None = None
_failure: CoreLoadError | None = None


def load(path: str | None = None) -> Library:
    """Load libnghttp2 once per process (``path`` overrides the soname, for tests).

    Raises :class:`CoreLoadError` with the reason when the library is absent, too old, or
    its structs do not have the layout declared here.
    """
    global _loaded, _failure
    if path is None:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
    try:
        result = _load(path or os.environ.get("ISTHMUS_NGHTTP2_LIBRARY") or SONAME)
    except CoreLoadError as exc:
        if path is None:
            _failure = exc
        raise
    if path is None:
        _loaded = result
    return result


def _load(name: str) -> Library:
    try:
        import cffi
    except ImportError:
        raise CoreLoadError("the Python package cffi is not installed") from None
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(name)
    except OSError as exc:
        found = ctypes.util.find_library("nghttp2")
        hint = f" (found {found} instead)" if found and found != name else ""
        detail = str(exc).split(".  Additionally", 1)[0]
        raise CoreLoadError(f"{detail}{hint}; install the Debian/Ubuntu package "
                            "libnghttp2-14") from None
    try:
        info = lib.nghttp2_version(0)
    except AttributeError:
        raise CoreLoadError(f"{name} is not libnghttp2 (no nghttp2_version)") from None
    version = ffi.string(info.version_str).decode("ascii", "replace")
    num = int(info.version_num)
    vt = ((num >> 16) & 0xFF, (num >> 8) & 0xFF, num & 0xFF)
    if vt < MIN_VERSION:
        raise CoreLoadError(f"libnghttp2 {version} is older than "
                            f"{'.'.join(map(str, MIN_VERSION))}")
    # ABI mode cannot see the real headers: check the layouts we index into by hand.
    if ffi.sizeof("nghttp2_nv") != 5 * ffi.sizeof("size_t"):
        raise CoreLoadError(f"unexpected nghttp2_nv layout ({ffi.sizeof('nghttp2_nv')} bytes)")
    protections: dict[str, bool] = {}
    for key, sym in {**BASE_SETTERS, **OPTIONAL_SETTERS}.items():
        try:
            getattr(lib, sym)
        except AttributeError:
            protections[key] = False
        else:
            protections[key] = True
    for sym in ("nghttp2_session_server_new2", "nghttp2_session_mem_recv",
                "nghttp2_session_mem_send", "nghttp2_session_consume",
                "nghttp2_option_set_no_auto_window_update", "nghttp2_submit_headers"):
        try:
            getattr(lib, sym)
        except AttributeError:
            raise CoreLoadError(f"libnghttp2 {version} lacks {sym}") from None
    return Library(ffi=ffi, lib=lib, path=name, version=version, version_num=num,
                   protections=protections)
