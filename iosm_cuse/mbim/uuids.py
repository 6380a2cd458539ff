"""Service and context-type UUIDs.

On the wire a UUID is its 16 bytes in network (big-endian) order: ``uuid.UUID(...).bytes``.
"""

from enum import Enum
from uuid import UUID


class Service(Enum):
    BASIC_CONNECT = UUID("a289cc33-bcbb-8b4f-b6b0-133ec2aae6df")
    SMS = UUID("533fbeeb-14fe-4467-9f90-33a223e56c3f")
    USSD = UUID("e550a0c8-5e82-479e-82f7-10abf4c3351f")
    PHONEBOOK = UUID("4bf38476-1e6a-41db-b1d8-bed289c25bdb")
    STK = UUID("d8f20131-fcb5-4e17-8602-d6ed3816164c")
    AUTH = UUID("1d2b5ff7-0aa1-48b2-aa52-50f15767174e")
    DSS = UUID("c08a26dd-7718-4382-8482-6e0d583c4d0e")
    MS_FIRMWARE_ID = UUID("e9f7dea2-feaf-4009-93ce-90a3694103b6")
    MS_HOST_SHUTDOWN = UUID("883b7c26-985f-43fa-9804-27d7fb80959c")
    MS_SAR = UUID("68223d04-9f6c-4e0f-822d-28441fb72340")
    PROXY_CONTROL = UUID("838cf7fb-8d0d-4d7f-871e-d71dbefbb39b")
    QMI = UUID("d1a30bc2-f97a-6e43-bf65-c7e24fb0f0d3")
    ATDS = UUID("5967bdcc-7fd2-49a2-9f5c-b2e70e527db3")
    QDU = UUID("6427015f-579d-48f5-8c54-f43ed1e76f83")
    MS_BASIC_CONNECT_EXTENSIONS = UUID("3d01dcc5-fef5-4d05-0d3a-bef7058e9aaf")
    MS_UICC_LOW_LEVEL_ACCESS = UUID("c2f6588e-f037-4bc9-8665-f4d44bd09367")
    MS_VOICE_EXTENSIONS = UUID("8d8b9eba-37be-449b-8f1e-61cb034a702e")
    INTEL_FIRMWARE_UPDATE = UUID("0ed374cb-f835-4474-bc11-3b3fd76f5641")
    INTEL_THERMAL_RF = UUID("fdc22af2-f441-4d46-af8d-259fcdde4635")
    INTEL_MUTUAL_AUTHENTICATION = UUID("f85d46ef-ab26-4081-9868-4d183c0a3aec")
    INTEL_TOOLS = UUID("4ada4962-b988-46c3-87a7-97f20f994abb")
    INTEL_AT_TUNNEL = UUID("da138c64-6515-4893-92b2-a1e1ca7c81ca")

    @classmethod
    def lookup(cls, value: UUID) -> "Service | None":
        return _SERVICE_BY_UUID.get(value)


_SERVICE_BY_UUID = {s.value: s for s in Service}


class ContextType(Enum):
    NONE = UUID("b43f758c-a560-4b46-b35e-c5869641fb54")
    INTERNET = UUID("7e5e2a7e-4e6f-7272-736b-656e7e5e2a7e")
    VPN = UUID("9b9f7bbe-8952-44b7-83ac-ca41318df7a0")
    VOICE = UUID("88918294-0ef4-4396-8cca-a8588fbc02b2")
    VIDEO_SHARE = UUID("05a2a716-7c34-4b4d-9a91-c5ef0c7aaacc")
    PURCHASE = UUID("b3272496-ac6c-422b-a8c0-acf687a27217")
    IMS = UUID("21610d01-3074-4bce-9425-b53a07d697d6")
    MMS = UUID("46726664-7269-6bc6-9624-d1d35389aca9")
    LOCAL = UUID("a57a9afc-b09f-45d7-bb40-033c39f60db9")
    ADMIN = UUID("5f7e4c2e-e80b-40a9-a239-f0abcfd11f4b")
    APP = UUID("74d88a3d-dfbd-4799-9a8c-7310a37bb2ee")
    XCAP = UUID("50d378a7-baa5-4a50-b872-3fe5bb463411")
    TETHERING = UUID("5e4e0601-48dc-4e2b-acb8-08b4016bbaac")
    EMERGENCY_CALLING = UUID("5f41adb8-204e-4d31-9da8-b3c970e360f2")
