"""Discovery over mDNS on loopback only: separate OS processes find each other and notice departures.

Run as a script (``python tests/test_discovery.py child SPEC``) this file is the child node the
multi-process tests spawn: it advertises, prints its peer set as JSON lines on every change, and
stops when told to on stdin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from p2pfl.discovery import SERVICE_TYPE, Discovery, PeerAd, ad_from_info
from p2pfl.errors import ConfigError

LOOPBACK = ["127.0.0.1"]
FIND_TIMEOUT_S = 15.0
DROP_TIMEOUT_S = 10.0


def hex16() -> str:
    return secrets.token_hex(8)


def make_ad(federation_id: str, port: int, name: str = "node") -> PeerAd:
    return PeerAd(
        node_id=hex16(),
        federation_id=federation_id,
        name=name,
        host="127.0.0.1",
        port=port,
        fingerprint=hex16(),
    )


# ---------------------------------------------------------------- child process (script mode)


async def _child_main(ad: PeerAd) -> None:
    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def changed() -> None:
        emit("peers", peers={k: asdict(v) for k, v in disc.peers().items()})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:  # any line or EOF (parent gone) means stop
        os.read(sys.stdin.fileno(), 4096)
        stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    disc = Discovery(ad, LOOPBACK, on_change=changed)
    await disc.start()
    emit("started")
    changed()
    try:
        await asyncio.wait_for(stop.wait(), timeout=90)  # never outlive a broken test run
    except TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    began = time.monotonic()
    await disc.stop()
    emit("stopped", seconds=time.monotonic() - began)


class Child:
    """One node in its own OS process; its latest peer set is mirrored here by a reader thread."""

    def __init__(self, ad: PeerAd, log_dir: Path) -> None:
        self.ad = ad
        self.peers: dict[str, dict] = {}
        self.events: list[str] = []
        self._cond = threading.Condition()
        self._stderr = open(log_dir / f"child-{ad.port}.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, "child", json.dumps(asdict(ad))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(msg["event"])
                if msg["event"] == "peers":
                    self.peers = msg["peers"]
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def request_stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._stderr.close()

    def log_text(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text()


@pytest.fixture
def spawn(tmp_path):
    children: list[Child] = []

    def _spawn(ad: PeerAd) -> Child:
        child = Child(ad, tmp_path)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.close()


def sees(other: Child):
    return lambda me: other.ad.node_id in me.peers


# ---------------------------------------------------------------- multi-process tests


@pytest.mark.slow
def test_processes_find_own_federation_only(spawn):
    fed, other_fed = hex16(), hex16()
    began = time.monotonic()
    a = spawn(make_ad(fed, 21001, "alice"))
    b = spawn(make_ad(fed, 21002, "bob"))
    c = spawn(make_ad(other_fed, 21003, "carol"))
    d = spawn(make_ad(other_fed, 21004, "dave"))

    for me, other in ((a, b), (b, a), (c, d), (d, c)):
        assert me.wait_for(sees(other), FIND_TIMEOUT_S), (
            f"{me.ad.name} did not find {other.ad.name}; events={me.events}\n{me.log_text()}"
        )
    print(f"\nmutual discovery of 4 processes after {time.monotonic() - began:.2f} s from spawn")

    # The other federation's ads demonstrably circulate on this link (c and d found each other),
    # yet a and b report only each other, with exactly the advertised data; no one reports itself.
    assert a.peers == {b.ad.node_id: asdict(b.ad)}
    assert b.peers == {a.ad.node_id: asdict(a.ad)}
    assert c.peers == {d.ad.node_id: asdict(d.ad)}
    assert d.peers == {c.ad.node_id: asdict(c.ad)}


@pytest.mark.slow
def test_stopped_process_drops_out(spawn):
    fed = hex16()
    a = spawn(make_ad(fed, 21011, "alice"))
    b = spawn(make_ad(fed, 21012, "bob"))
    assert a.wait_for(sees(b), FIND_TIMEOUT_S), a.log_text()
    assert b.wait_for(sees(a), FIND_TIMEOUT_S), b.log_text()

    began = time.monotonic()
    b.request_stop()
    assert a.wait_for(lambda me: b.ad.node_id not in me.peers, DROP_TIMEOUT_S), (
        f"a still reports b; events={a.events}\n{a.log_text()}"
    )
    print(f"\npeer dropped {time.monotonic() - began:.3f} s after stop was requested")
    assert b.wait_for(lambda me: "stopped" in me.events, 10.0), b.log_text()
    assert b.proc.wait(timeout=10) == 0, b.log_text()
    assert a.peers == {}


# ---------------------------------------------------------------- in-process tests


def test_malformed_ads_are_ignored_in_process(caplog):
    """A rogue responder on the link with bad TXT data is never reported; the good peer is."""
    caplog.set_level(logging.DEBUG, logger="p2pfl.discovery")
    rogue_id = asyncio.run(asyncio.wait_for(_rogue_scenario(), timeout=30))
    # it was received and refused (debug log), not merely missed
    assert any(rogue_id in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)


async def _rogue_scenario() -> str:
    fed = hex16()
    me_changes: list[dict] = []
    me = Discovery(make_ad(fed, 21021, "me"), LOOPBACK, on_change=lambda: me_changes.append(me.peers()))
    good_ad = make_ad(fed, 21022, "good")
    good = Discovery(good_ad, LOOPBACK)
    rogue_zc = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    rogue_id = hex16()
    bad_props = {"id": rogue_id, "fed": fed, "name": "x" * 200, "fp": hex16(), "v": "1"}  # name too long
    rogue = ServiceInfo(
        SERVICE_TYPE,
        f"{rogue_id}.{SERVICE_TYPE}",
        port=21023,
        properties=bad_props,
        server=f"rogue-{rogue_id}.local.",
        parsed_addresses=["127.0.0.1"],
    )
    try:
        await rogue_zc.async_register_service(rogue)
        await asyncio.gather(me.start(), good.start())
        deadline = time.monotonic() + FIND_TIMEOUT_S
        while good_ad.node_id not in me.peers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # the rogue was announced before either of us started, so it had every chance to show up
        assert me.peers() == {good_ad.node_id: good_ad}
        assert me_changes and all(rogue_id not in seen for seen in me_changes)
    finally:
        await good.stop()
        await me.stop()
        await rogue_zc.async_close()
    assert me.peers() == {}
    return rogue_id


# ---------------------------------------------------------------- TXT validation (no network)


def _info(
    ad: PeerAd, *, service_name: str | None = None, addresses=("127.0.0.1",), **overrides
) -> ServiceInfo:
    props: dict = {"id": ad.node_id, "fed": ad.federation_id, "name": ad.name, "fp": ad.fingerprint, "v": "1"}
    props.update(overrides)
    props = {k: v for k, v in props.items() if v is not None}
    return ServiceInfo(
        SERVICE_TYPE,
        service_name or f"{ad.node_id}.{SERVICE_TYPE}",
        port=ad.port,
        properties=props,
        server="host.local.",
        parsed_addresses=list(addresses),
    )


def test_valid_ad_round_trips():
    ad = make_ad(hex16(), 1883, "worker-7")
    assert ad_from_info(_info(ad)) == ad


@pytest.mark.parametrize(
    "overrides",
    [
        {"id": None},
        {"fed": None},
        {"fp": None},
        {"name": None},
        {"v": None},
        {"v": "2"},
        {"id": "not-hex-at-all!!"},
        {"id": "ABCDEF0123456789"},
        {"fed": "abc"},
        {"fp": "0" * 17},
        {"name": ""},
        {"name": "x" * 65},
        {"name": "bad\nname"},
        {"name": b"\xff\xfe"},
    ],
)
def test_malformed_txt_rejected(overrides):
    ad = make_ad(hex16(), 1883)
    with pytest.raises(ValueError):
        ad_from_info(_info(ad, **overrides))


def test_oversized_txt_rejected():
    ad = make_ad(hex16(), 1883)
    info = _info(ad, **{f"pad{i}": "y" * 200 for i in range(4)})
    with pytest.raises(ValueError, match="TXT record"):
        ad_from_info(info)


def test_name_must_match_id_and_address_must_be_usable():
    ad = make_ad(hex16(), 1883)
    with pytest.raises(ValueError, match="instance name"):
        ad_from_info(_info(ad, service_name=f"{hex16()}.{SERVICE_TYPE}"))
    with pytest.raises(ValueError, match="IPv4"):
        ad_from_info(_info(ad, addresses=()))
    with pytest.raises(ValueError, match="IPv4"):
        ad_from_info(_info(ad, addresses=("0.0.0.0",)))
    with pytest.raises(ValueError, match="port"):
        ad_from_info(_info(replace(ad, port=0)))


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "short"},
        {"federation_id": "Z" * 16},
        {"fingerprint": ""},
        {"name": "n" * 65},
        {"host": "localhost"},
        {"host": "::1"},
        {"port": 0},
    ],
)
def test_invalid_own_ad_refused(change):
    with pytest.raises(ConfigError):
        Discovery(replace(make_ad(hex16(), 1883), **change), LOOPBACK)


def test_interfaces_required():
    with pytest.raises(ConfigError):
        Discovery(make_ad(hex16(), 1883), [])


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    asyncio.run(_child_main(PeerAd(**json.loads(sys.argv[2]))))
