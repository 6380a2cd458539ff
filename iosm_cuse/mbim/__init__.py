"""The MBIM codec: messages, fragments, UUIDs and CID information buffers, declared as data.

Pure: bytes in, values out (and back). Shared by the host side and the modem model.
"""

from iosm_cuse.mbim.constants import CommandType, MessageType, ProtocolError, Status
from iosm_cuse.mbim.infobuf import InfoBufferError, InfoLayout, decode, encode
from iosm_cuse.mbim.message import (
    Close,
    CloseDone,
    Command,
    CommandDone,
    FeedResult,
    Fragment,
    FragmentCollector,
    FragmentError,
    FunctionError,
    HostError,
    IndicateStatus,
    Message,
    MessageError,
    Open,
    OpenDone,
    decode_message,
    decode_transfer,
    encode_message,
    fragment,
)
from iosm_cuse.mbim.uuids import ContextType, Service

__all__ = [
    "Close",
    "CloseDone",
    "Command",
    "CommandDone",
    "CommandType",
    "ContextType",
    "FeedResult",
    "Fragment",
    "FragmentCollector",
    "FragmentError",
    "FunctionError",
    "HostError",
    "IndicateStatus",
    "InfoBufferError",
    "InfoLayout",
    "Message",
    "MessageError",
    "MessageType",
    "Open",
    "OpenDone",
    "ProtocolError",
    "Service",
    "Status",
    "decode",
    "decode_message",
    "decode_transfer",
    "encode",
    "encode_message",
    "fragment",
]
