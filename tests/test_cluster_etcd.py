"""Cluster nodes in one process against a real etcd on the loopback (no root):
claims, checkpoints, takeover past the checkpoint in window and strict mode,
compare-and-swap conflicts, the fence when etcd does not answer, a clean
leave, replication of control-socket changes.  tests/test_cluster.py does the
same with real daemons and traffic in network namespaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from espdp.client import format_cluster
from espdp.cluster.config import parse_cluster
from espdp.cluster.node import Cluster
from espdp.cluster.store import EtcdUnavailable, Store
from espdp.xfrm import Xfrm

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None and os.geteuid() != 0,
                                reason="needs etcd (scripts/bootstrap.sh installs etcd-server)")

KEY_OUT, KEY_IN = "0x" + "11" * 20, "0x" + "22" * 20
PEER = "192.0.2.50"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    d = tmp_path_factory.mktemp("etcd")
    client, peer = _port(), _port()
    url = f"http://127.0.0.1:{client}"
    log = open(d / "log", "wb")  # noqa: SIM115 - closed at the end
    proc = subprocess.Popen(
        ["etcd", "--name", "t", "--data-dir", str(d / "data"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((d / "log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()


class Nodes:
    """Cluster nodes sharing one etcd, each with its own XFRM model holding the same
    two SAs (to and from PEER), driven by :meth:`pump` as the daemon's loop would."""

    def __init__(self, etcd: str, tmp_path, **settings) -> None:
        secret = tmp_path / "secret"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
        self.settings = {"endpoints": [etcd], "addresses": ["192.0.2.1"],
                         "secret_file": str(secret), "name": tmp_path.name[-40:],
                         "segments": 4, "lease_ttl": 2, "fence_margin": 0.5,
                         "checkpoint_interval": 0.2, "max_rate": 10000, **settings}
        self.nodes: dict[str, Cluster] = {}

    def start(self, name: str) -> Cluster:
        cfg = parse_cluster({"node": name, **self.settings}, "test")
        x = Xfrm()
        for src, dst, spi, key in (("192.0.2.1", PEER, 0x100, KEY_OUT),
                                   (PEER, "192.0.2.1", 0x200, KEY_IN)):
            x.execute(f"state add src {src} dst {dst} proto esp spi {spi:#x} mode tunnel "
                      f"replay-window 64 aead 'rfc4106(gcm(aes))' {key} 128", 0)
        node = Cluster(cfg, x)
        node.agent.start()
        self.nodes[name] = node
        return node

    def pump(self, until, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in list(self.nodes.values()):
                node.poll()
            value = until()
            if value:
                return value
            time.sleep(0.01)
        raise AssertionError(f"{what}: not within {timeout}s")

    def crash(self, name: str) -> None:
        """As kill -9: no more forwarding, no goodbye to etcd."""
        node = self.nodes.pop(name)
        node.filter.fence_until = 0.0
        node.agent._stopping.set()
        node.agent.request(("wake",))
        node.agent._thread.join(3)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        self.nodes.clear()


@pytest.fixture
def nodes(etcd, tmp_path):
    n = Nodes(etcd, tmp_path)
    yield n
    n.close()


def sa(node: Cluster, spi: int):
    return next(st for st in node.xfrm.sad.dump() if st.info.spi == spi)


def owner_of_peer(n: Nodes) -> Cluster:
    return n.pump(lambda: next((c for c in n.nodes.values() if c.armed and c.forwarding),
                               None), 10, "the peer's segment is armed somewhere")


def settled(n: Nodes, timeout: float = 10) -> None:
    n.pump(lambda: sorted(s for c in n.nodes.values() for s in c.owned) == list(range(4))
           and all(c.owned for c in n.nodes.values()), timeout, "segments shared out")


def _takeover(n: Nodes):
    for name in ("a", "b"):
        n.start(name)
    settled(n)
    old = owner_of_peer(n)
    out, inb = sa(old, 0x100).engine, sa(old, 0x200).engine
    out.oseq = 3000                                   # as if 3000 packets went out ...
    inb.set_replay_state(700, 0, 0b101)               # ... and 700 came in, 699 missing
    n.pump(lambda: old.agent.counters["checkpoint_records"] >= 4 and not
           old._checkpoint_pending and all(a.written[0] == 3000 or a.written[1] == 700
                                           for a in old.armed.values()), 5, "checkpointed")
    out.oseq = 3100                                   # sent after the last checkpoint
    n.crash(old.cfg.node)
    new = next(iter(n.nodes.values()))
    t = time.monotonic()
    n.pump(lambda: len(new.owned) == 4 and len(new.armed) == 2, 6, "takeover")
    return new, time.monotonic() - t


def test_a_crashed_owner_is_taken_over_past_its_checkpoint_window_mode(nodes):
    new, took = _takeover(nodes)
    jump = new.cfg.jump
    out, inb = sa(new, 0x100), sa(new, 0x200)
    assert out.engine.oseq == 3000 + jump > 3100      # past anything the old owner sent
    state = inb.engine.replay_state()
    assert (state["seq"], state["bitmap"]) == (700, 0b101)   # the window, as checkpointed
    assert took < new.cfg.lease_ttl + 1.5
    nodes.pump(lambda: new.agent.view["takeovers"] >= 1, 3, "the takeover is on record")
    status = new.status()
    assert status["takeovers"] >= 1 and status["takeover_log"][-1]["to"] == new.cfg.node
    text = format_cluster(json.loads(json.dumps(status)))   # as the CLI gets it
    assert f"node {new.cfg.node}: forwarding" in text
    assert f"takeovers so far: {status['takeovers']}" in text
    assert f"-> {new.cfg.node}" in text and "segments: 0:" in text


def test_strict_mode_accepts_only_past_the_checkpoint_plus_the_jump(etcd, tmp_path):
    n = Nodes(etcd, tmp_path, inbound="strict")
    try:
        new, _ = _takeover(n)
        state = sa(new, 0x200).engine.replay_state()
        assert state["seq"] == 700 + new.cfg.jump and state["bitmap"] == (1 << 64) - 1
    finally:
        n.close()


def test_a_checkpoint_written_by_another_node_stops_this_one_using_the_sa(nodes):
    a = nodes.start("a")
    settled(nodes)
    ckpt_id = next(iter(a.armed))
    engine = a.armed[ckpt_id].engine
    store = Store(tuple(nodes.settings["endpoints"]), 1.0)
    store.put(a.agent.ckpt_key(ckpt_id), b'{"oseq": 99999, "seq": 0, "bitmap": "0", '
              b'"session": "someone else"}')
    engine.oseq += 10
    nodes.pump(lambda: ckpt_id in a.contested, 5, "conflict noticed")
    assert not a.filter.armed(engine) and a.agent.counters["conflicts"] == 1


def test_a_checkpoint_this_run_wrote_but_never_heard_back_about_is_not_a_conflict(nodes):
    a = nodes.start("a")
    settled(nodes)
    ckpt_id, armed = next(iter(a.armed.items()))
    store = Store(tuple(nodes.settings["endpoints"]), 1.0)
    # etcd applied a write whose answer was lost: the revision moved under us
    store.put(a.agent.ckpt_key(ckpt_id), json.dumps(
        {"oseq": armed.engine.oseq, "seq": 0, "bitmap": "0", "session": a.agent.session}))
    before = a.agent.counters["checkpoint_writes"]
    armed.engine.oseq += 10
    nodes.pump(lambda: a.agent.counters["checkpoint_writes"] > before, 5, "checkpoint")
    assert a.filter.armed(armed.engine) and not a.contested


def test_a_node_that_cannot_renew_stops_before_its_lease_can_expire_and_says_why(nodes):
    a = nodes.start("a")
    settled(nodes)
    real = a.agent.store.keepalive

    def unreachable(lease):
        raise EtcdUnavailable("http://etcd: ConnectionFailedError: (test)")

    a.agent.store.keepalive = unreachable
    last = a.agent.last_renew
    nodes.pump(lambda: not a.forwarding, 4, "stops forwarding")
    stopped = time.monotonic()
    assert stopped - last <= a.cfg.lease_ttl - a.cfg.fence_margin + 0.3
    assert "etcd unreachable" in a.reason(time.monotonic())
    assert "stopped before the lease could expire" in a.reason(time.monotonic())
    a.agent.store.keepalive = real
    nodes.pump(lambda: a.forwarding, 4, "forwards again")


def test_a_clean_leave_hands_segments_over_at_once_and_is_no_takeover(nodes):
    a, b = nodes.start("a"), nodes.start("b")
    settled(nodes)
    leaving = set(a.owned)
    nodes.nodes.pop("a")
    a.close()
    t = time.monotonic()
    nodes.pump(lambda: b.owned >= leaving, 3, "b takes a's segments")
    assert time.monotonic() - t < b.cfg.lease_ttl
    time.sleep(1.1)
    nodes.pump(lambda: b.agent.view["revision"] > 0, 2, "view")
    assert b.agent.view["takeovers"] == 0 and b.agent.counters["takeovers"] == 0


def test_sas_installed_on_one_node_reach_the_others_sealed(nodes):
    a, b = nodes.start("a"), nodes.start("b")
    settled(nodes)
    secret_key = "0x" + "c3" * 20
    control = a.replicating(a.xfrm)
    control.execute(f"ip xfrm state add src 192.0.2.1 dst 192.0.2.60 proto esp spi 0x300 "
                    f"mode tunnel aead 'rfc4106(gcm(aes))' {secret_key} 128", time.monotonic())
    nodes.pump(lambda: any(st.info.spi == 0x300 for st in b.xfrm.sad.dump()), 5,
               "replicated to b")
    assert bytes(sa(b, 0x300).info.aead.key).hex() == secret_key[2:]
    store = Store(tuple(nodes.settings["endpoints"]), 1.0)
    kvs, _, _ = store.range(a.cfg.prefix, prefix=True)
    assert any("/state/sa/" in kv.key for kv in kvs)
    assert not any(bytes.fromhex(secret_key[2:]) in kv.value or secret_key[2:].encode()
                   in kv.value for kv in kvs)
    control.execute("state delete src 192.0.2.1 dst 192.0.2.60 proto esp spi 0x300",
                    time.monotonic())
    nodes.pump(lambda: not any(st.info.spi == 0x300 for st in b.xfrm.sad.dump()), 5,
               "deleted on b")
