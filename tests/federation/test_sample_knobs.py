"""The sample services' test knobs (federation/demo/samples.py): fail, delay, close and
hang, per request from headers, query parameters or gRPC metadata, scoped by cluster; and
nothing changes without them.  Real servers on loopback, real httpx and grpcio clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from federation.demo.samples import GRPC_CHAT, GRPC_SAY, make_grpc_server, make_http_server
from federation.server._embedded import free_port


@pytest.fixture(scope="module")
def http() -> Iterator[str]:
    srv = make_http_server("east", "127.0.0.1:0")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    port = free_port()
    srv = make_grpc_server("east", f"127.0.0.1:{port}")
    srv.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    srv.stop(0)


def test_without_knobs_the_samples_answer_as_before(http: str) -> None:
    with httpx.Client(base_url=http) as c:
        r = c.get("/")
        assert (r.status_code, r.text, r.headers["x-served-by"]) == (200, "hello from east\n", "east")
        assert c.get("/bytes/10").content == b"x" * 10
        assert c.post("/echo", content=b"abc").content == b"abc"
        assert c.get("/?unrelated=1").status_code == 200


@pytest.mark.parametrize("how", ["query", "header"])
def test_fail_answers_503_from_the_cluster(http: str, how: str) -> None:
    with httpx.Client(base_url=http) as c:
        r = c.get("/?fail=100") if how == "query" else c.get("/", headers={"x-sample-fail": "100"})
        assert r.status_code == 503 and r.headers["x-served-by"] == "east" and "injected" in r.text
        assert c.get("/bytes/5?fail=100&status=500").status_code == 500
        assert c.post("/echo?fail=100", content=b"abc").status_code == 503
        assert c.get("/?fail=0").status_code == 200


def test_fail_takes_a_share_of_requests(http: str) -> None:
    with httpx.Client(base_url=http) as c:
        failed = sum(c.get("/?fail=30").status_code == 503 for _ in range(400))
    assert 80 <= failed <= 160  # 30 % of 400 is 120; sd ~9


def test_knobs_scoped_to_another_cluster_leave_this_one_alone(http: str) -> None:
    with httpx.Client(base_url=http) as c:
        assert c.get("/?fail=100&only=west").status_code == 200
        assert c.get("/?fail=100&only=west,east").status_code == 503
        assert c.get("/", headers={"x-sample-fail": "100", "x-sample-only": "central"}).status_code == 200


def test_delay_holds_the_answer(http: str) -> None:
    with httpx.Client(base_url=http) as c:
        for delay in ("200ms", "200"):
            t0 = time.monotonic()
            assert c.get(f"/?delay={delay}").status_code == 200
            assert time.monotonic() - t0 >= 0.2


def test_close_drops_the_connection_without_an_answer(http: str) -> None:
    with httpx.Client(base_url=http) as c, pytest.raises(httpx.RemoteProtocolError):
        c.get("/?close=100")


def test_hang_never_answers_until_the_caller_gives_up(http: str) -> None:
    t0 = time.monotonic()
    with httpx.Client(base_url=http, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.get("/?hang=100")
    assert time.monotonic() - t0 >= 0.5
    with httpx.Client(base_url=http) as c:  # the server still serves
        assert c.get("/").status_code == 200


def test_grpc_without_knobs_answers_as_before(channel: grpc.Channel) -> None:
    assert channel.unary_unary(GRPC_SAY)(b"bob", timeout=5) == b"hello bob from east"
    assert list(channel.stream_stream(GRPC_CHAT)(iter([b"a"]), timeout=5)) == [b"a [east]"]


def test_grpc_fail_answers_unavailable_or_the_code_asked(channel: grpc.Channel) -> None:
    say = channel.unary_unary(GRPC_SAY)
    with pytest.raises(grpc.RpcError) as err:
        say(b"x", timeout=5, metadata=[("x-sample-fail", "100")])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "east" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        say(b"x", timeout=5, metadata=[("x-sample-fail", "100"), ("x-sample-code", "resource-exhausted")])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        list(channel.stream_stream(GRPC_CHAT)(iter([b"a"]), timeout=5, metadata=[("x-sample-fail", "100")]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert say(b"x", timeout=5, metadata=[("x-sample-fail", "100"), ("x-sample-only", "west")]) == \
        b"hello x from east"


def test_grpc_delay_and_hang(channel: grpc.Channel) -> None:
    say = channel.unary_unary(GRPC_SAY)
    t0 = time.monotonic()
    assert say(b"x", timeout=5, metadata=[("x-sample-delay", "200ms")]) == b"hello x from east"
    assert time.monotonic() - t0 >= 0.2
    with pytest.raises(grpc.RpcError) as err:
        say(b"x", timeout=0.5, metadata=[("x-sample-hang", "100")])
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
