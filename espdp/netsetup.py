"""What the daemon installs in the kernel for its TUN device, and how it goes away again.

The tunnel process owns a TUN device (say ``esp0``).  To make the host send
traffic for the remote subnets into it, :class:`NetSetup` installs, through
rtnetlink (pyroute2's ``IPRoute``, never by running ``ip``):

* **addresses** on the device -- the "virtual IP" an IKE peer assigned.
  IPv4 addresses are installed plainly.  IPv6 ones are installed with
  ``IFA_F_NODAD``: a TUN has no link partner to detect duplicates with, and an
  address in DAD is *tentative* (unusable) for a second or more -- forever on
  a device without carrier.  An IPv6 virtual IP must also never become the
  source the kernel picks for *other* destinations (RFC 6724 would happily
  pick it for, say, a ULA destination, and those packets would leave through
  the uplink with an address that only exists inside the tunnel).  By default
  the address is therefore **deprecated** (preferred lifetime 0, valid lifetime
  forever, passed as ``IFA_CACHEINFO``): source selection avoids deprecated
  addresses (rule 3), yet they stay fully usable when chosen explicitly.
  ``address_mode="label"`` instead keeps the address preferred and gives it an
  address label of its own (``RTM_NEWADDRLABEL``; pyroute2 has no API for it,
  so a small ``ifaddrlblmsg`` is sent by hand): source selection rule 6 then
  prefers addresses whose label matches the destination's, which ordinary
  destinations (label 1, ``::/0``) do not.  ``address_mode="plain"`` does
  neither.
* **routes** for the remote subnets through the device, each with
  ``RTA_PREFSRC`` = the virtual IP of the same family (when there is one).
  That is what makes traffic into the tunnel use the virtual IP even though it
  is deprecated / labelled away: an explicit preferred source overrides
  source-address selection.
* **peer host routes**: when a remote subnet covers the peer's own (outer)
  address -- typically ``0.0.0.0/0`` or ``::/0``, "send everything through the
  tunnel" -- the ESP packets to the peer would be routed into the tunnel
  itself and loop.  :meth:`NetSetup.exclude_peer` looks the peer up *before*
  the tunnel routes exist (``RTM_GETROUTE``: gateway and output device) and,
  once a covering route is installed, pins it with a /32 or /128 host route
  via that path, which wins by longest prefix.

Everything installed is recorded, as soon as it is installed, in a JSON state
file ``{state_dir}/{ifname}.json`` (directory 0700, file 0600, replaced
atomically) together with the owner's pid and process start time.
:meth:`NetSetup.teardown` removes what the file lists and then the file.  If
the daemon dies without tearing down (SIGKILL, OOM, power cut of the VM),
the addresses and routes on the TUN device mostly vanish with a
non-persistent device -- but peer host routes live on the uplink, address
labels are per namespace, and a persistent device stays.  So at start
:func:`cleanup_stale` reads a leftover state file whose owner is dead and
removes what it lists; a live owner is a :class:`~espdp.errors.ConfigError`.

Netlink errors become :class:`~espdp.errors.ConfigError` with a message naming
the object and the device, e.g. ``cannot add address fd09:1::1/128 on esp0:
File exists``.  Removing something already gone is not an error.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
import tempfile
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELADDRLABEL, RTM_NEWADDRLABEL
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .errors import ConfigError

__all__ = ["ADDRESS_MODES", "DEFAULT_LABEL", "NetSetup", "cleanup_stale", "state_path"]

logger = logging.getLogger(__name__)

ADDRESS_MODES = ("deprecated", "label", "plain")
DEFAULT_LABEL = 0xE5D0  # address label for virtual IPs in "label" mode
INFINITY = 0xFFFFFFFF  # "forever" for address lifetimes
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in an IPv4 route delete: "any scope"
RTN_LOCAL = 2
# "already gone" when removing something
_GONE = {errno.ESRCH, errno.ENOENT, errno.ENODEV, errno.EADDRNOTAVAIL}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ifaddrlblmsg(nlmsg):  # noqa: N801 -- the kernel's struct name
    """``struct ifaddrlblmsg`` (RTM_NEWADDRLABEL); pyroute2 does not define it."""

    fields = (
        ("family", "B"),
        ("reserved", "B"),
        ("prefixlen", "B"),
        ("flags", "B"),
        ("index", "I"),
        ("seq", "I"),
    )
    nla_map = (
        ("IFAL_UNSPEC", "none"),
        ("IFAL_ADDRESS", "ip6addr"),
        ("IFAL_LABEL", "uint32"),
    )


def state_path(ifname: str, state_dir: str = "/run/espdp") -> str:
    """The state file recording what the owner of ``ifname`` installed."""
    return os.path.join(state_dir, f"{ifname}.json")


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return os.strerror(exc.code) if exc.code else str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _code(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return exc.code
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses
    rest = stat[stat.rfind(b")") + 2:].split()
    return int(rest[19])  # field 22, "starttime"


def _owner_alive(state: dict[str, Any]) -> bool:
    """Is the process that wrote ``state`` still running?"""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = _start_time(pid)
    if started is None:
        return False
    if state.get("start_time") is not None:
        return started == state["start_time"]  # same pid, same process
    try:  # no start time recorded: is it an espdp process at all?
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"espdp" in f.read()
    except OSError:
        return False


def _write_state(path: str, state: dict[str, Any]) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            json.dump(state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read state file {path}: {exc}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"cannot read state file {path}: not a JSON object")
    return state


class _Kernel:
    """The netlink side: one IPRoute (opened lazily), errors as ConfigError."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            try:
                self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
            except (OSError, NetlinkError) as exc:
                where = f"network namespace {self.netns}" if self.netns else "rtnetlink"
                raise ConfigError(f"cannot open {where}: {_strerror(exc)}") from None
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def index(self, ifname: str) -> int | None:
        try:
            found = self.ipr.link_lookup(ifname=ifname)
        except (OSError, NetlinkError) as exc:
            raise ConfigError(f"cannot look up device {ifname}: {_strerror(exc)}") from None
        return found[0] if found else None

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OSError, NetlinkError) as exc:
            raise ConfigError(f"cannot {what}: {_strerror(exc)}") from None

    def remove(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """Remove something; False if it was already gone."""
        try:
            fn(*args, **kwargs)
        except (OSError, NetlinkError) as exc:
            if _code(exc) in _GONE:
                return False
            raise ConfigError(f"cannot remove {what}: {_strerror(exc)}") from None
        return True

    def addrlabel(self, add: bool, prefix: str, label: int) -> None:
        net = ipaddress.IPv6Network(prefix)
        msg = ifaddrlblmsg()
        msg["family"] = socket.AF_INET6
        msg["prefixlen"] = net.prefixlen
        msg["attrs"] = [("IFAL_ADDRESS", str(net.network_address)), ("IFAL_LABEL", label)]
        msg["header"]["type"] = RTM_NEWADDRLABEL if add else RTM_DELADDRLABEL
        flags = NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["flags"] = flags | NLM_F_CREATE | NLM_F_EXCL if add else flags
        self.ipr.nlm_request_batch([msg])


def _remove_recorded(kernel: _Kernel, state: dict[str, Any]) -> dict[str, list[str]]:
    """Remove every object ``state`` lists; return what was actually removed.

    Order: tunnel routes first, then the peer host routes (so ESP to the peer
    never falls into the tunnel meanwhile), labels, addresses, the device.
    Objects on the TUN device are only touched if a device of that name still
    exists *with the recorded index* -- a new device of the same name is not ours.
    """
    ifname = state.get("ifname", "?")
    removed: dict[str, list[str]] = {
        "routes": [], "peer_routes": [], "labels": [], "addresses": [], "device": []}
    idx = kernel.index(ifname) if ifname != "?" else None
    ours = idx is not None and idx == state.get("ifindex")
    ipr = kernel.ipr
    if ours:
        for route in reversed(state.get("routes", [])):
            kwargs = {"dst": route["dst"], "oif": idx, "scope": RT_SCOPE_NOWHERE}
            if route.get("metric") is not None:
                kwargs["priority"] = route["metric"]
            if kernel.remove(f"route {route['dst']} on {ifname}", ipr.route, "del", **kwargs):
                removed["routes"].append(route["dst"])
    for route in reversed(state.get("peer_routes", [])):
        kwargs = {"dst": route["dst"], "oif": route["oif"], "scope": RT_SCOPE_NOWHERE}
        if route.get("gateway"):
            kwargs["gateway"] = route["gateway"]
        if kernel.remove(f"peer route {route['dst']}", ipr.route, "del", **kwargs):
            removed["peer_routes"].append(route["dst"])
    for lbl in reversed(state.get("labels", [])):
        if kernel.remove(f"address label {lbl['prefix']}", kernel.addrlabel, False,
                         lbl["prefix"], lbl["label"]):
            removed["labels"].append(lbl["prefix"])
    if ours:
        for addr in reversed(state.get("addresses", [])):
            iface = ipaddress.ip_interface(addr["cidr"])
            if kernel.remove(f"address {addr['cidr']} on {ifname}", ipr.addr, "del",
                             index=idx, address=str(iface.ip),
                             prefixlen=iface.network.prefixlen):
                removed["addresses"].append(addr["cidr"])
        if state.get("device") and kernel.remove(f"device {ifname}", ipr.link, "del",
                                                  index=idx):
            removed["device"].append(ifname)
    return removed


def cleanup_stale(ifname: str, state_dir: str = "/run/espdp",
                  netns: str | None = None) -> dict[str, list[str]]:
    """Remove what a dead owner of ``ifname`` left installed, and its state file.

    Returns what was removed (empty lists if there was no state file).  Raises
    :class:`ConfigError` if the owner is still running.
    """
    path = state_path(ifname, state_dir)
    state = _read_state(path)
    empty: dict[str, list[str]] = {
        "routes": [], "peer_routes": [], "labels": [], "addresses": [], "device": []}
    if state is None:
        return empty
    if _owner_alive(state):
        raise ConfigError(f"another espdp owns {ifname} (pid {state.get('pid')})")
    kernel = _Kernel(netns if netns is not None else state.get("netns"))
    try:
        removed = _remove_recorded(kernel, state)
    finally:
        kernel.close()
    os.unlink(path)
    if any(removed.values()):
        logger.warning("removed what a dead espdp (pid %s) left on %s: %s",
                       state.get("pid"), ifname, removed)
    return removed


class NetSetup:
    """Addresses, routes and peer host routes for one TUN device, recorded as installed.

    Construction runs :func:`cleanup_stale` (its result is in ``stale_removed``);
    nothing is written before the first object is installed.
    """

    def __init__(self, ifname: str, state_dir: str = "/run/espdp",
                 address_mode: str = "deprecated", netns: str | None = None,
                 label: int = DEFAULT_LABEL) -> None:
        if address_mode not in ADDRESS_MODES:
            raise ConfigError(f"unknown address mode {address_mode!r}; "
                              f"expected one of {', '.join(ADDRESS_MODES)}")
        self.ifname = ifname
        self.state_dir = state_dir
        self.address_mode = address_mode
        self.netns = netns
        self.label = label
        self.path = state_path(ifname, state_dir)
        self.stale_removed = cleanup_stale(ifname, state_dir, netns)
        self._kernel = _Kernel(netns)
        self._peers: dict[Address, dict[str, Any]] = {}  # pending peer exclusions
        self._state = self._empty_state()

    def _empty_state(self) -> dict[str, Any]:
        return {"version": 1, "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                "ifname": self.ifname, "ifindex": None, "netns": self.netns,
                "addresses": [], "labels": [], "routes": [], "peer_routes": []}

    # -- plumbing --------------------------------------------------------------

    def _index(self) -> int:
        idx = self._kernel.index(self.ifname)
        if idx is None:
            raise ConfigError(f"device {self.ifname} does not exist")
        if self._state["ifindex"] is None:
            self._state["ifindex"] = idx
        return idx

    def _save(self) -> None:
        try:
            _write_state(self.path, self._state)
        except OSError as exc:
            raise ConfigError(f"cannot write state file {self.path}: {_strerror(exc)}") from None

    @property
    def state(self) -> dict[str, Any]:
        """A copy of what is recorded as installed."""
        return json.loads(json.dumps(self._state))

    def virtual_ip(self, version: int) -> Address | None:
        """The first address of IP ``version`` (4 or 6) installed with add_address."""
        for addr in self._state["addresses"]:
            ip = ipaddress.ip_interface(addr["cidr"]).ip
            if ip.version == version:
                return ip
        return None

    # -- installing --------------------------------------------------------------

    def record_device(self) -> None:
        """Record that the daemon created ``ifname`` as a persistent device (removed too)."""
        self._index()
        self._state["device"] = self.ifname
        self._save()

    def add_address(self, cidr: str) -> None:
        """Install an address on the device (IPv6: NODAD, plus deprecated or label)."""
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError as exc:
            raise ConfigError(f"bad address {cidr!r}: {exc}") from None
        text = iface.with_prefixlen
        idx = self._index()
        kwargs: dict[str, Any] = {"index": idx, "address": str(iface.ip),
                                  "prefixlen": iface.network.prefixlen}
        if iface.version == 6:
            kwargs["flags"] = IFA_F_NODAD
            if self.address_mode == "deprecated":
                kwargs.update(preferred=0, valid=INFINITY)
        what = f"add address {text} on {self.ifname}"
        self._kernel.call(what, self._kernel.ipr.addr, "add", **kwargs)
        self._state["addresses"].append({"cidr": text, "mode": (
            self.address_mode if iface.version == 6 else "plain")})
        self._save()
        if iface.version == 6 and self.address_mode == "label":
            prefix = f"{iface.ip}/128"
            self._kernel.call(f"add address label {self.label} for {prefix}",
                              self._kernel.addrlabel, True, prefix, self.label)
            self._state["labels"].append({"prefix": prefix, "label": self.label})
            self._save()

    def add_route(self, cidr: str, src: str | None = None, metric: int | None = None) -> None:
        """Route a remote subnet into the device; source = ``src`` or the virtual IP.

        ``metric`` (default: the kernel's) lets a route coexist with one for the
        same prefix, e.g. ``::/0`` next to the uplink's default route.
        """
        try:
            net = ipaddress.ip_network(cidr, strict=False)
            pref = ipaddress.ip_address(src) if src else self.virtual_ip(net.version)
        except ValueError as exc:
            raise ConfigError(f"bad route {cidr!r}: {exc}") from None
        if pref is not None and pref.version != net.version:
            raise ConfigError(f"route {net} and source {pref} are of different families")
        idx = self._index()
        # pin the peers this route would swallow before it exists
        for peer in list(self._peers):
            if peer.version == net.version and peer in net:
                self._install_peer_route(peer)
        kwargs: dict[str, Any] = {"dst": net.with_prefixlen, "oif": idx}
        if net.version == 4:
            kwargs["scope"] = RT_SCOPE_LINK  # as "ip route add ... dev esp0"
        if pref is not None:
            kwargs["prefsrc"] = str(pref)
        if metric is not None:
            kwargs["priority"] = metric
        what = f"add route {net} on {self.ifname}" + (f" (src {pref})" if pref else "")
        self._kernel.call(what, self._kernel.ipr.route, "add", **kwargs)
        self._state["routes"].append(
            {"dst": net.with_prefixlen, "src": str(pref) if pref else None, "metric": metric})
        self._save()

    def exclude_peer(self, peer_ip: str) -> bool:
        """Keep ESP to ``peer_ip`` out of the tunnel: pin its current path with a host route.

        Call it before add_route (the path is looked up now, while no tunnel route
        covers the peer).  The host route is installed as soon as an installed
        route covers the peer; returns True if it is installed now.
        """
        try:
            peer = ipaddress.ip_address(peer_ip)
        except ValueError as exc:
            raise ConfigError(f"bad peer address {peer_ip!r}: {exc}") from None
        if peer in self._peers or any(
                r["dst"] == f"{peer}/{peer.max_prefixlen}" for r in self._state["peer_routes"]):
            return self._peers.get(peer, {}).get("installed", True)
        idx = self._index()
        try:
            found = self._kernel.ipr.route("get", dst=str(peer))
        except (OSError, NetlinkError) as exc:
            raise ConfigError(f"cannot find a route to peer {peer}: {_strerror(exc)}") from None
        msg = found[0]
        oif = msg.get_attr("RTA_OIF")
        if msg["type"] == RTN_LOCAL:
            return False  # the peer is this host: nothing to pin
        if oif == idx:
            raise ConfigError(f"peer {peer} is already routed into {self.ifname}; "
                              "call exclude_peer before add_route")
        self._peers[peer] = {"oif": oif, "gateway": msg.get_attr("RTA_GATEWAY"),
                             "installed": False}
        for route in self._state["routes"]:
            if peer in ipaddress.ip_network(route["dst"]):
                self._install_peer_route(peer)
                break
        return self._peers[peer]["installed"]

    def _install_peer_route(self, peer: Address) -> None:
        path = self._peers[peer]
        if path["installed"]:
            return
        dst = f"{peer}/{peer.max_prefixlen}"
        kwargs: dict[str, Any] = {"dst": dst, "oif": path["oif"]}
        if path["gateway"]:
            kwargs["gateway"] = path["gateway"]
        elif peer.version == 4:
            kwargs["scope"] = RT_SCOPE_LINK
        try:
            self._kernel.ipr.route("add", **kwargs)
        except (OSError, NetlinkError) as exc:
            if _code(exc) != errno.EEXIST:
                raise ConfigError(f"cannot add host route {dst} for peer: "
                                  f"{_strerror(exc)}") from None
            path["installed"] = True  # someone else's host route already pins it
            return
        path["installed"] = True
        self._state["peer_routes"].append(
            {"dst": dst, "oif": path["oif"], "gateway": path["gateway"]})
        self._save()

    # -- removing --------------------------------------------------------------

    def teardown(self) -> dict[str, list[str]]:
        """Remove everything recorded and the state file; idempotent. Returns what was removed."""
        removed: dict[str, list[str]] = {
            "routes": [], "peer_routes": [], "labels": [], "addresses": [], "device": []}
        try:
            if any(self._state[k] for k in ("addresses", "labels", "routes", "peer_routes")) \
                    or self._state.get("device"):
                removed = _remove_recorded(self._kernel, self._state)
            self._state = self._empty_state()
            self._peers.clear()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            self._kernel.close()
        return removed

    def close(self) -> None:
        """Close the netlink socket (keeps everything installed; see teardown)."""
        self._kernel.close()

    def __enter__(self) -> NetSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()
