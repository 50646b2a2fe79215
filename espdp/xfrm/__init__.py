"""The XFRM control plane of espdp: SAD and SPD with Linux XFRM semantics.

>>> from espdp.xfrm import Xfrm
>>> x = Xfrm()
>>> x.execute("ip xfrm state allocspi src 192.0.2.1 dst 192.0.2.2 proto esp "
...           "reqid 1 mode tunnel min 0x1000 max 0x1000 limit time-hard 120", now=0)["spi"]
'0x00001000'
>>> [e.type for e in x.tick(now=120)]
['expire']

- :mod:`.parse`, :mod:`.policy_parse`: ``ip xfrm state|policy`` lines (iproute2's syntax)
- :mod:`.sad`, :mod:`.spd`: the databases; :mod:`.events`: what they report
- :mod:`.model`: :class:`Xfrm`, the facade an IKE daemon, the tunnel or a test drives
"""

from .model import Decision, Xfrm

__all__ = ["Decision", "Xfrm"]
