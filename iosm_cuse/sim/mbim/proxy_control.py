"""PROXY_CONTROL, libmbim's private service: what a client sends to mbim-proxy first.

Answered so that the function can sit behind a stand-in for mbim-proxy; not a device service,
so DEVICE_SERVICES leaves it out.
"""

from __future__ import annotations

from iosm_cuse.mbim.cids import ProxyControl
from iosm_cuse.mbim.constants import Status
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim.handlers import Answer, FunctionContext, ServiceHandlers, Values

HANDLERS = ServiceHandlers(Service.PROXY_CONTROL, listed=False)


@HANDLERS.handles(ProxyControl.CONFIGURATION)
def configuration(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return Answer(Status.NONE, {})
