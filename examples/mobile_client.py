"""A mobile VPN client prototype that embeds espdp, as an Android app would.

The "OS" hands the client a TUN file descriptor it did not open (on Android,
``VpnService.Builder.establish()``; here the script opens one itself and
passes only the number on, or uses an in-memory pipe with ``--memory``).
The client:

1. wraps the fd in an :class:`espdp.tunnel.Tunnel` (UDP encapsulation on
   loopback) and installs one outbound and one inbound policy, no SA;
2. subscribes to ACQUIRE, EXPIRE and MAPPING events;
3. when an app sends its first packet, ACQUIRE fires: the callback plays the
   IKE exchange (here: it makes fresh keys, allocates an SPI and installs the
   SAs on both ends, the gateway being a second Tunnel in this process) and
   the packet held meanwhile goes out;
4. the gateway's side answers, the reply comes back through the client's TUN;
5. a soft lifetime on the outbound SA produces an EXPIRE event (a real client
   would rekey); then everything stops cleanly.

Run: ``sudo python examples/mobile_client.py`` (a real TUN, in a namespace
of your own is best) or ``python examples/mobile_client.py --memory`` (no
privileges).  It prints what happened and exits 0 when the reply arrived.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import time

from espdp.io.memory import MemoryPipe
from espdp.tunnel import Tunnel
from espdp.xfrm import Xfrm

CLIENT_IP, GATEWAY_NET, SERVER_IP = "10.77.0.2", "10.77.1.0/24", "10.77.1.1"
AEAD = "rfc4106(gcm(aes))"


def os_hands_over_a_tun(name: str) -> int:
    """What VpnService does for an app: a configured TUN; the app only gets the fd."""
    from espdp.io.tun import IFF_NO_PI, IFF_TUN, TUNSETIFF, set_up

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
                .ljust(40, b"\0"))
    set_up(name)
    os.system(f"ip addr add {CLIENT_IP}/32 dev {name} && "
              f"ip route add {GATEWAY_NET} dev {name} src {CLIENT_IP}")
    return fd


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP packet (checksum 0), as an app's packet looks inside a TUN."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return header + udp


class Client:
    def __init__(self, tun_fd: int | None, log) -> None:
        self.log = log
        self.events: list[str] = []
        self.pending: list = []
        if tun_fd is None:
            self.app, tun = MemoryPipe.pair()
            self.client = Tunnel(tun, xfrm=Xfrm(acquire_queue=8), udp_port=0,
                                 families=(4,), bind={4: "127.0.0.1"})
        else:
            self.app = None
            self.client = Tunnel.from_fd(tun_fd, owns_fd=True, xfrm=Xfrm(acquire_queue=8),
                                         udp_port=0, families=(4,), bind={4: "127.0.0.1"})
        # The gateway the client talks to: another dataplane in this process.
        self.server_side, gw_tun = MemoryPipe.pair()
        self.gateway = Tunnel(gw_tun, udp_port=0, families=(4,), bind={4: "127.0.0.1"})
        self.cport = self.client.dataplane.sockets[4].port
        self.gport = self.gateway.dataplane.sockets[4].port
        for tunnel, src, dst, out_tmpl, in_tmpl in (
                (self.client, f"{CLIENT_IP}/32", GATEWAY_NET, "reqid 1", "reqid 2"),
                (self.gateway, GATEWAY_NET, f"{CLIENT_IP}/32", "reqid 2", "reqid 1")):
            tunnel.execute(f"policy add src {src} dst {dst} dir out tmpl src 127.0.0.1 "
                           f"dst 127.0.0.1 proto esp {out_tmpl} mode tunnel")
            tunnel.execute(f"policy add src {dst} dst {src} dir in tmpl src 127.0.0.1 "
                           f"dst 127.0.0.1 proto esp {in_tmpl} mode tunnel")
        self.client.subscribe(self.on_acquire, ["acquire"])
        self.client.subscribe(self.on_event, ["expire", "mapping"])

    def on_acquire(self, event) -> None:
        """Noted, answered from the loop: an IKE daemon negotiates asynchronously
        (and the model must not be changed from inside its own callback)."""
        self.events.append("acquire")
        self.log(f"ACQUIRE seq {event.seq} for {event.sel['src']} -> {event.sel['dst']}")
        self.pending.append(event)

    def negotiate(self, event) -> None:
        """The IKE daemon's part, in a few lines: keys, SPIs, SAs on both ends."""
        out_key, in_key = ("0x" + os.urandom(20).hex() for _ in range(2))
        spi_in = int(self.client.execute(
            "state allocspi src 127.0.0.1 dst 127.0.0.1 proto esp mode tunnel reqid 2 "
            "min 0x1000 max 0x1fff")["spi"], 16)
        spi_out = 0x2001
        out = (f"src 127.0.0.1 dst 127.0.0.1 proto esp spi {spi_out:#x} reqid 1 mode tunnel "
               f"aead '{AEAD}' {out_key} 128 encap espinudp {self.cport} {self.gport} 0.0.0.0 "
               "replay-window 64")
        back = (f"src 127.0.0.1 dst 127.0.0.1 proto esp spi {spi_in:#x} reqid 2 mode tunnel "
                f"aead '{AEAD}' {in_key} 128 encap espinudp {self.gport} {self.cport} 0.0.0.0 "
                "replay-window 64")
        self.client.execute(f"state add {out} seq {event.seq} limit packet-soft 3")
        self.client.execute(f"state update {back}")
        self.gateway.execute(f"state add {out}")
        self.gateway.execute(f"state add {back}")
        self.log(f"SAs installed: out spi {spi_out:#x}, in spi {spi_in:#x}")

    def on_event(self, event) -> None:
        self.events.append(event.type)
        self.log(f"{event.type.upper()} {getattr(event, 'hard', '')}".strip())

    def run(self, send_app_packet, wait_reply, rounds: int = 5) -> bool:
        ok = True
        for i in range(rounds):
            send_app_packet(f"hello {i}".encode())
            request = self._pump(lambda: self.server_side.pending(), 3.0)
            if not request:
                self.log(f"round {i}: the gateway got nothing")
                return False
            self._answer_on_gateway(i)
            reply = wait_reply(lambda: self._pump(lambda: False, 0.05))
            ok &= reply == f"reply {i}".encode()
            self.log(f"round {i}: app got {reply!r}")
        return ok

    def _pump(self, done, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.client.poll(0.01)
            self.gateway.poll(0.01)
            while self.pending:
                self.negotiate(self.pending.pop(0))
            if done():
                return True
        return False

    def _answer_on_gateway(self, i: int) -> None:
        """The server behind the gateway echoes the app's datagram."""
        from espdp.engine import PacketBatch

        batch = PacketBatch(4)
        self.server_side.read_batch(batch)
        request = batch.packet(0)
        sport, dport = struct.unpack("!HH", request[20:24])
        self.server_side.write(udp_packet(SERVER_IP, CLIENT_IP, dport, sport,
                                          f"reply {i}".encode()))

    def close(self) -> None:
        self.client.close()
        self.gateway.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="store_true", help="an in-memory TUN (no root)")
    parser.add_argument("--tun", default="espmob0")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(f"client: {text}", flush=True)

    fd = None if args.memory else os_hands_over_a_tun(args.tun)
    client = Client(fd, log)
    try:
        if args.memory:
            from espdp.engine import PacketBatch

            def send(payload: bytes) -> None:
                client.app.write(udp_packet(CLIENT_IP, SERVER_IP, 40000, 7, payload))

            def wait_reply(pump) -> bytes:
                for _ in range(60):
                    pump()
                    if client.app.pending():
                        batch = PacketBatch(4)
                        client.app.read_batch(batch)
                        return batch.packet(0)[28:]
                return b""
        else:
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            app.bind((CLIENT_IP, 40000))
            app.setblocking(False)

            def send(payload: bytes) -> None:
                app.sendto(payload, (SERVER_IP, 7))

            def wait_reply(pump) -> bytes:
                for _ in range(60):
                    pump()
                    try:
                        return app.recv(2048)
                    except BlockingIOError:
                        continue
                return b""

        ok = client.run(send, wait_reply)
        log(f"events: {', '.join(client.events)}")
        ok = ok and "acquire" in client.events and "expire" in client.events
        log("done: " + ("every reply arrived" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
