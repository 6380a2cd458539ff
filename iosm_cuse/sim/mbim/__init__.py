"""The modem's MBIM function (behind channel 6), in layers.

- ``function.py``: ``MbimFunction``, framing and dispatch (OPEN/CLOSE, fragments, subscribe
  list, indications, the fragment deadline), sans-IO;
- ``modem.py``: ``ModemState``, the SIM, radio, registration, packet service and sessions, whose
  changes return the ``Indication``s they cause;
- ``handlers.py``: how a service registers its CIDs' handlers; ``basic_connect.py`` and
  ``proxy_control.py`` are the services;
- ``channel.py``: ``MbimChannelFunction``, the asyncio ChannelFunction adapter.
"""

from iosm_cuse.sim.mbim.channel import MbimChannelFunction
from iosm_cuse.sim.mbim.function import MbimFunction
from iosm_cuse.sim.mbim.modem import (
    Change,
    Indication,
    ModemState,
    PacketStatistics,
    SessionState,
)

__all__ = [
    "Change",
    "Indication",
    "MbimChannelFunction",
    "MbimFunction",
    "ModemState",
    "PacketStatistics",
    "SessionState",
]
