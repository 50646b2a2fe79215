"""etcd through its JSON gateway (``/v3/...``), with etcd3gw doing the HTTP.

A thin, blocking layer used only by the agent's thread: leases, ranges,
puts and transactions, with etcd's int64-as-string JSON turned into ints and
every transport failure turned into :class:`EtcdUnavailable`.  Several
endpoints are tried in turn.  Proxy settings from the environment are
ignored (etcd is always reached directly).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Optional

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

API_PATH = "/v3/"   # etcd 3.4 and later


class EtcdUnavailable(Exception):
    """etcd did not answer (or answered with an error); the message says which."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


def b64(data: Any) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


def _kv(item: dict) -> KV:
    return KV(base64.b64decode(item["key"]).decode(), base64.b64decode(item.get("value", "")),
              int(item.get("mod_revision", 0)), int(item.get("create_revision", 0)),
              int(item.get("lease", 0)))


def compare(key: str, target: str, value: Any, result: str = "EQUAL") -> dict:
    """A txn comparison: ``target`` CREATE, MOD, VERSION or VALUE."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
             "VALUE": "value"}[target]
    return {"key": b64(key), "target": target, "result": result,
            field: b64(value) if target == "VALUE" else str(value)}


def put(key: str, value: Any, lease: int = 0) -> dict:
    request: dict = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def get(key: str, prefix: bool = False) -> dict:
    request = {"key": b64(key)}
    if prefix:
        request["range_end"] = b64(prefix_end(key))
    return {"request_range": request}


def delete(key: str) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


class Store:
    """The etcd operations the agent needs."""

    def __init__(self, endpoints: tuple, timeout: float, ca_cert: Optional[str] = None,
                 cert: Optional[str] = None, key: Optional[str] = None) -> None:
        self._clients = []
        for url in endpoints:
            session = requests.Session()
            session.trust_env = False
            if ca_cert:
                session.verify = ca_cert
            if cert and key:
                session.cert = (cert, key)
            protocol, _, rest = url.partition("://")
            host, _, port = rest.rpartition(":")
            self._clients.append(Etcd3Client(host=host.strip("[]"), port=int(port),
                                             protocol=protocol, timeout=timeout,
                                             api_path=API_PATH, session=session))
        self._current = 0
        self.endpoints = tuple(endpoints)
        self.requests = 0

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _post(self, path: str, body: dict) -> dict:
        client = self._clients[self._current]
        self.requests += 1
        try:
            return client.post(client.get_url(path), json=body)
        except (Etcd3Exception, requests.RequestException, ValueError) as e:
            self._current = (self._current + 1) % len(self._clients)
            raise EtcdUnavailable(f"{self.endpoints[self._current - 1]}: "
                                  f"{type(e).__name__}: {str(e)[:160]}") from None

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL; <= 0 when it is gone."""
        answer = self._post("/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._post("/kv/lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------ keys

    def range(self, key: str, prefix: bool = False, min_mod_revision: int = 0,
              count_only: bool = False) -> tuple[list[KV], int, int]:
        """(kvs sorted by mod revision, count, header revision)."""
        body: dict = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if min_mod_revision:
            body["min_mod_revision"] = str(min_mod_revision)
            body["sort_target"] = "MOD"
            body["sort_order"] = "ASCEND"
        if count_only:
            body["count_only"] = True
        answer = self._post("/kv/range", body)
        kvs = [_kv(item) for item in answer.get("kvs", [])]
        return kvs, int(answer.get("count", 0)), int(answer["header"]["revision"])

    def put(self, key: str, value: Any, lease: int = 0) -> int:
        body: dict = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/kv/put", body)["header"]["revision"])

    def txn(self, compares: list, success: list, failure: Optional[list] = None
            ) -> tuple[bool, list, int]:
        """(succeeded, the responses of the branch taken, revision after it)."""
        answer = self._post("/kv/txn", {"compare": compares, "success": success,
                                        "failure": failure or []})
        responses = []
        for item in answer.get("responses", []):
            if "response_range" in item:
                responses.append([_kv(kv) for kv in item["response_range"].get("kvs", [])])
            else:
                responses.append(item)
        return bool(answer.get("succeeded", False)), responses, \
            int(answer["header"]["revision"])
