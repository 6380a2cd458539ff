"""How a CID's handler is declared: registered next to its code, one table per service.

A service module makes one ``ServiceHandlers`` and decorates each handler with the CID it
answers (``@BASIC_CONNECT.handles(BasicConnect.RADIO_STATE)``), the way libmbim describes a
service in one JSON file: adding a CID touches one place. A handler gets the request decoded by
the CID's layout (so enum values are already members) and returns an ``Answer``; it never sees
MBIM framing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from iosm_cuse.mbim import cids
from iosm_cuse.mbim.constants import Status
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim.modem import Indication, ModemState

Values = dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """A handler's result: the status, the response values (None: no payload), indications."""

    status: Status
    values: Values | None = None
    indications: Sequence[Indication] = ()


class FunctionContext(Protocol):
    """What a handler may use of the function besides the request."""

    @property
    def modem(self) -> ModemState: ...

    def subscribe(self, events: dict[UUID, frozenset[int]]) -> None:
        """Replace the host's subscribe list (an empty CID set: every CID of the service)."""

    def supported_cids(self) -> dict[Service, list[int]]:
        """The CIDs DEVICE_SERVICES lists, per service."""

    def request_reboot(self) -> None:
        """MODEM_REBOOT: reset the modem's state and have the device drop and come back."""


Handler = Callable[[FunctionContext, int, Values], Answer]


class ServiceHandlers:
    """The handlers of one service, keyed by CID."""

    def __init__(self, service: Service, *, listed: bool = True) -> None:
        self.service = service
        self.listed = listed              # False: private, left out of DEVICE_SERVICES
        self._by_cid: dict[int, Handler] = {}

    def handles(self, cid: int) -> Callable[[Handler], Handler]:
        """Decorator: register the handler of ``cid``; the CID must be declared in cids.py."""
        spec = cids.lookup(self.service, cid)
        if spec is None or spec.response is None:
            raise ValueError(f"{self.service.name} CID {cid} has no declared response layout")

        def register(handler: Handler) -> Handler:
            if cid in self._by_cid:
                raise ValueError(f"{spec.name}: a second handler")
            self._by_cid[cid] = handler
            return handler
        return register

    def __iter__(self) -> Iterator[tuple[int, Handler]]:
        return iter(self._by_cid.items())
