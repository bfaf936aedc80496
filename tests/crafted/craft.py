#!/usr/bin/env python3
"""Crafted frames for sgfw's crafted-packet test (tests/tests/crafted.rs).

One long-lived process (scapy is imported once) that runs as root in the
host's network namespace and enters the lab's namespaces itself (setns on
/run/netns/NAME) to open its sockets there: a socket keeps the namespace it
was made in. It reads one JSON request per line on stdin and answers one
JSON line on stdout.

    {"op": "probe",
     "taps":    [{"ns": NS|null, "iface": IF, "match": EXPR, "info": EXPR|null,
                  "until": N|null}],
     "sockets": [{"ns": NS|null, "family": 4|6, "port": P, "device": IF|null,
                  "until": N|null}],
     "sends":   [{"ns": NS|null, "iface": IF, "frames": EXPR}
                 | {"ns": NS|null, "udp": {"family": 4|6, "src": [ADDR, PORT],
                    "device": IF|null, "dst": [ADDR, PORT], "payload": TEXT}}],
     "timeout": SECONDS}

Every tap and socket is opened before the first frame is sent, so nothing
is missed. A tap is an AF_PACKET socket on IF inside NS that counts the
frames the interface *receives* (never what it sends) for which EXPR is true;
EXPR sees `p` (the frame dissected by scapy from Ether up) and `raw` (its
bytes). `info` is evaluated on each matching frame and returned (e.g. a
fragment offset). A socket is a UDP socket bound to PORT that returns the
datagrams the namespace's stack delivers to it (after reassembly). A `frames`
send evaluates EXPR with scapy's names in scope to a frame or a list of
frames and writes each, in order, to IF with an AF_PACKET socket (what
scapy's sendp does); a `udp` send goes through the namespace's own IP stack
(SO_BINDTODEVICE, SO_BROADCAST), as a host's DHCP server would; a send
that the host's netfilter refuses (EPERM) is "refused" in `sent`.

The probe returns when every tap and socket has an `until` and has reached
it, else after `timeout` seconds:

    {"ok": true, "taps": [{"count": N, "info": [...], "frames": [SUMMARY]}],
     "sockets": [{"datagrams": [{"from": ADDR, "hex": HEX}]}],
     "sent": [FRAMES WRITTEN | "sent" | "refused", ...]}
    {"ok": false, "error": TEXT}

An error in an expression (a typo, a field that does not exist) is an
error of the probe, never a non-match: a drop must never be asserted by a
matcher that cannot match.

`craft.py send NS IFACE EXPR` and `craft.py sniff NS IFACE EXPR SECONDS`
do one send or one capture by hand (NS "-" = the host).
"""

import ctypes
import json
import logging
import os
import select
import socket
import sys
import time

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import *  # noqa: E402,F401,F403  (the expressions use scapy's names)
from scapy.all import Ether, fragment, fragment6  # noqa: E402

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
SO_BINDTODEVICE = 25
PACKET_OUTGOING = 4

_libc = ctypes.CDLL(None, use_errno=True)
_HOME = os.open("/proc/self/ns/net", os.O_RDONLY)


def _setns(fd, what):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


class InNs:
    """Runs a block inside network namespace `ns` (None: the host's)."""

    def __init__(self, ns):
        self.ns = ns

    def __enter__(self):
        if self.ns:
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                _setns(fd, self.ns)
            finally:
                os.close(fd)

    def __exit__(self, *exc):
        if self.ns:
            _setns(_HOME, "back to the host")


def frags4(pkt, size):
    """IPv4 fragments of `pkt` (an IP packet), `size` bytes of payload each."""
    return fragment(pkt, fragsize=size)


def frags6(pkt, size):
    """IPv6 fragments of `pkt` (IPv6/IPv6ExtHdrFragment/...), at most `size` bytes each."""
    return fragment6(pkt, size)


def same(a, b):
    """Whether two address texts name the same address (either family)."""
    fam = socket.AF_INET6 if ":" in str(a) else socket.AF_INET
    try:
        return socket.inet_pton(fam, str(a)) == socket.inet_pton(fam, str(b))
    except OSError:
        return False


def on_wire(src, dst, pkts):
    """Each IP packet of `pkts` in an Ethernet frame from MAC `src` to `dst`."""
    return [Ether(src=src, dst=dst) / p for p in pkts]


def first_then_reversed(fs):
    """The first fragment, then the others last to second."""
    return [fs[0]] + list(reversed(fs[1:]))


def without_first(fs):
    """Every fragment but the first."""
    return list(fs[1:])


ENV = dict(globals())

# Frames every matcher is tried on when its tap opens: an expression that
# fails on one of them (a name or field that does not exist, a layer used
# without checking for it) is an error before anything is sent.
SAMPLES = [
    Ether() / IP() / UDP() / Raw(b"x"),
    Ether() / IP() / TCP(),
    Ether() / IP() / ICMP() / IPerror() / UDPerror(),
    Ether() / IP(flags="MF") / UDP(),
    Ether() / IPv6() / UDP() / Raw(b"x"),
    Ether() / IPv6() / IPv6ExtHdrFragment() / UDP(),
    Ether() / IPv6() / ICMPv6EchoRequest(),
    Ether() / IPv6() / ICMPv6ND_NS(),
    Ether() / IPv6() / ICMPv6ND_NA(),
    Ether() / ARP(),
    Ether() / Dot1Q() / IP() / TCP(),
]

_senders = {}


def sender(ns, iface):
    key = (ns, iface)
    s = _senders.get(key)
    if s is None:
        with InNs(ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.bind((iface, 0))
        _senders[key] = s
    return s


def frames_of(expr):
    v = eval(compile(expr, "<frames>", "eval"), ENV)  # noqa: S307 (test input)
    if not isinstance(v, (list, tuple)):
        v = [v]
    return [x if isinstance(x, (bytes, bytearray)) else bytes(x) for x in v]


class Tap:
    def __init__(self, spec):
        self.match = compile(spec["match"], "<match>", "eval")
        self.info = compile(spec["info"], "<info>", "eval") if spec.get("info") else None
        self.until = spec.get("until")
        self.count = 0
        self.infos = []
        self.summaries = []
        for sample in SAMPLES:
            p = Ether(bytes(sample))
            scope = {"p": p, "raw": bytes(sample)}
            if eval(self.match, ENV, scope) and self.info is not None:  # noqa: S307
                eval(self.info, ENV, scope)  # noqa: S307
        with InNs(spec.get("ns")):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            s.bind((spec["iface"], ETH_P_ALL))
        s.setblocking(False)
        self.sock = s

    def read(self):
        while True:
            try:
                raw, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            p = Ether(raw)
            scope = {"p": p, "raw": raw}
            if eval(self.match, ENV, scope):  # noqa: S307
                self.count += 1
                if self.info is not None:
                    self.infos.append(eval(self.info, ENV, scope))  # noqa: S307
                if len(self.summaries) < 8:
                    self.summaries.append(p.summary())

    def done(self):
        return self.until is not None and self.count >= self.until

    def result(self):
        return {"count": self.count, "info": self.infos, "frames": self.summaries}


class UdpSink:
    def __init__(self, spec):
        fam = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
        with InNs(spec.get("ns")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if spec.get("device"):
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, spec["device"].encode())
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", spec["port"]))
        s.setblocking(False)
        self.sock = s
        self.until = spec.get("until")
        self.datagrams = []

    def read(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.datagrams.append({"from": addr[0], "hex": data.hex()})

    def done(self):
        return self.until is not None and len(self.datagrams) >= self.until

    def result(self):
        return {"datagrams": self.datagrams}


def udp_send(ns, u):
    fam = socket.AF_INET6 if u["family"] == 6 else socket.AF_INET
    with InNs(ns):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if u.get("device"):
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, u["device"].encode())
        s.bind(tuple(u["src"]))
        try:
            s.sendto(u["payload"].encode(), tuple(u["dst"]))
        except PermissionError:
            # A netfilter drop on the way out: not sent, which the taps
            # show as not delivered.
            return "refused"
    finally:
        s.close()
    return "sent"


def probe(req):
    taps = [Tap(t) for t in req.get("taps", [])]
    sinks = [UdpSink(s) for s in req.get("sockets", [])]
    sent = []
    try:
        for snd in req.get("sends", []):
            if "frames" in snd:
                s = sender(snd.get("ns"), snd["iface"])
                fs = frames_of(snd["frames"])
                for f in fs:
                    s.send(f)
                sent.append(len(fs))
            else:
                sent.append(udp_send(snd.get("ns"), snd["udp"]))
        all_until = all(x.until is not None for x in taps + sinks)
        deadline = time.monotonic() + float(req.get("timeout", 1.0))
        socks = {x.sock.fileno(): x for x in taps + sinks}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(socks), [], [], left)
            for fd in ready:
                socks[fd].read()
            if all_until and all(x.done() for x in taps + sinks):
                break
        for x in taps + sinks:
            x.read()
        return {
            "ok": True,
            "taps": [t.result() for t in taps],
            "sockets": [s.result() for s in sinks],
            "sent": sent,
        }
    finally:
        for x in taps + sinks:
            x.sock.close()


def serve():
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get("op") != "probe":
                raise ValueError(f"unknown op {req.get('op')!r}")
            resp = probe(req)
        except Exception as e:  # noqa: BLE001 (every failure goes back to the test)
            resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(resp, default=str), flush=True)


def main(argv):
    if len(argv) < 2 or argv[1] == "serve":
        serve()
    elif argv[1] == "send" and len(argv) == 5:
        ns = None if argv[2] == "-" else argv[2]
        for f in frames_of(argv[4]):
            sender(ns, argv[3]).send(f)
    elif argv[1] == "sniff" and len(argv) == 6:
        ns = None if argv[2] == "-" else argv[2]
        r = probe(
            {
                "taps": [{"ns": ns, "iface": argv[3], "match": argv[4]}],
                "timeout": float(argv[5]),
            }
        )
        print(json.dumps(r, indent=1))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
