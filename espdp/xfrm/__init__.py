"""The XFRM control plane of espdp.

For now this package holds only :mod:`espdp.xfrm.parse`, the reader of
``ip xfrm state`` command lines (iproute2 syntax).
"""
