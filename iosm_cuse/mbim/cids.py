"""CIDs and their information buffers, declared once as data.

Each ``CidSpec`` says, per direction, which ``InfoLayout`` the information buffer has: ``set`` and
``query`` (host → device), ``response`` (COMMAND_DONE) and ``notification`` (INDICATE_STATUS).
``None`` means the CID has no such direction; ``EMPTY`` means it has one with no payload.
Facts from MBIM 1.0 and libmbim's ``data/mbim-service-*.json``.

A field whose values an enum names is tied to it (``u32("PinType", PinType)``), as libmbim's JSON
ties ``"format": "guint32", "public-format": "MbimPinType"``: decoding rejects a value outside
the enum once, here, for every CID that carries the field; handlers never re-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from iosm_cuse.mbim.constants import CommandType
from iosm_cuse.mbim.infobuf import (
    EMPTY,
    InfoLayout,
    inline_struct,
    ipv4,
    ipv4_array,
    ipv6,
    ipv6_array,
    ref_byte_array,
    ref_ipv4,
    ref_ipv6,
    ref_struct_array,
    string,
    string_array,
    struct_array,
    u32,
    u32_array,
    u64,
    unsized_byte_array,
    uuid,
)
from iosm_cuse.mbim.uuids import Service

# ----------------------------------------------------------------------------------- values


class DeviceType(IntEnum):
    UNKNOWN = 0
    EMBEDDED = 1
    REMOVABLE = 2
    REMOTE = 3


class CellularClass(IntFlag):
    GSM = 1
    CDMA = 2


class VoiceClass(IntEnum):
    UNKNOWN = 0
    NO_VOICE = 1
    SEPARATED_VOICE_DATA = 2
    SIMULTANEOUS_VOICE_DATA = 3


class SimClass(IntFlag):
    LOGICAL = 1
    REMOVABLE = 2


class DataClass(IntFlag):
    GPRS = 1 << 0
    EDGE = 1 << 1
    UMTS = 1 << 2
    HSDPA = 1 << 3
    HSUPA = 1 << 4
    LTE = 1 << 5
    NR5G_NSA = 1 << 6
    NR5G_SA = 1 << 7
    CUSTOM = 1 << 31


class SmsCaps(IntFlag):
    PDU_RECEIVE = 1
    PDU_SEND = 2
    TEXT_RECEIVE = 4
    TEXT_SEND = 8


class ControlCaps(IntFlag):
    REG_MANUAL = 1
    HW_RADIO_SWITCH = 2
    CDMA_MOBILE_IP = 4
    CDMA_SIMPLE_IP = 8
    MULTI_CARRIER = 16


class ReadyState(IntEnum):
    NOT_INITIALIZED = 0
    INITIALIZED = 1
    SIM_NOT_INSERTED = 2
    BAD_SIM = 3
    FAILURE = 4
    NOT_ACTIVATED = 5
    DEVICE_LOCKED = 6


class RadioState(IntEnum):
    OFF = 0
    ON = 1


class PinType(IntEnum):
    UNKNOWN = 0
    CUSTOM = 1
    PIN1 = 2
    PIN2 = 3
    DEVICE_SIM_PIN = 4
    DEVICE_FIRST_SIM_PIN = 5
    NETWORK_PIN = 6
    NETWORK_SUBSET_PIN = 7
    SERVICE_PROVIDER_PIN = 8
    CORPORATE_PIN = 9
    SUBSIDY_LOCK = 10
    PUK1 = 11
    PUK2 = 12


class PinState(IntEnum):
    UNLOCKED = 0
    LOCKED = 1


class PinOperation(IntEnum):
    ENTER = 0
    ENABLE = 1
    DISABLE = 2
    CHANGE = 3


class PinMode(IntEnum):
    NOT_SUPPORTED = 0
    ENABLED = 1
    DISABLED = 2


class PinFormat(IntEnum):
    UNKNOWN = 0
    NUMERIC = 1
    ALPHANUMERIC = 2


class ProviderState(IntFlag):
    UNKNOWN = 0
    HOME = 1
    FORBIDDEN = 2
    PREFERRED = 4
    VISIBLE = 8
    REGISTERED = 16


class RegisterState(IntEnum):
    UNKNOWN = 0
    DEREGISTERED = 1
    SEARCHING = 2
    HOME = 3
    ROAMING = 4
    PARTNER = 5
    DENIED = 6


class RegisterMode(IntEnum):
    UNKNOWN = 0
    AUTOMATIC = 1
    MANUAL = 2


class RegisterAction(IntEnum):
    AUTOMATIC = 0
    MANUAL = 1


class VisibleProvidersAction(IntEnum):
    FULL_SCAN = 0
    RESTRICTED_SCAN = 1


class RegistrationFlag(IntFlag):
    NONE = 0
    MANUAL_SELECTION_NOT_AVAILABLE = 1
    PACKET_SERVICE_AUTOMATIC_ATTACH = 2


class PacketServiceAction(IntEnum):
    ATTACH = 0
    DETACH = 1


class PacketServiceState(IntEnum):
    UNKNOWN = 0
    ATTACHING = 1
    ATTACHED = 2
    DETACHING = 3
    DETACHED = 4


class ActivationCommand(IntEnum):
    DEACTIVATE = 0
    ACTIVATE = 1


class ActivationState(IntEnum):
    UNKNOWN = 0
    ACTIVATED = 1
    ACTIVATING = 2
    DEACTIVATED = 3
    DEACTIVATING = 4


class VoiceCallState(IntEnum):
    NONE = 0
    IN_PROGRESS = 1
    HANG_UP = 2


class Compression(IntEnum):
    NONE = 0
    ENABLE = 1


class AuthProtocol(IntEnum):
    NONE = 0
    PAP = 1
    CHAP = 2
    MSCHAPV2 = 3


class IpType(IntEnum):
    DEFAULT = 0
    IPV4 = 1
    IPV6 = 2
    IPV4V6 = 3
    IPV4_AND_IPV6 = 4


class IpConfigAvailable(IntFlag):
    NONE = 0
    ADDRESS = 1
    GATEWAY = 2
    DNS = 4
    MTU = 8


class SmsStorageState(IntEnum):
    NOT_INITIALIZED = 0
    INITIALIZED = 1


class SmsFormat(IntEnum):
    PDU = 0
    CDMA = 1


class SmsFlag(IntEnum):
    ALL = 0
    INDEX = 1
    NEW = 2
    OLD = 3
    SENT = 4
    DRAFT = 5


class SmsStatus(IntEnum):
    NEW = 0
    OLD = 1
    DRAFT = 2
    SENT = 3


class SmsStatusFlag(IntFlag):
    NONE = 0
    MESSAGE_STORE_FULL = 1
    NEW_MESSAGE = 2


class UssdAction(IntEnum):
    INITIATE = 0
    CONTINUE = 1
    CANCEL = 2


class UssdResponse(IntEnum):
    NO_ACTION_REQUIRED = 0
    ACTION_REQUIRED = 1
    TERMINATED_BY_NETWORK = 2
    OTHER_LOCAL_CLIENT = 3
    OPERATION_NOT_SUPPORTED = 4
    NETWORK_TIMEOUT = 5


class UssdSessionState(IntEnum):
    NEW_SESSION = 0
    EXISTING_SESSION = 1


class LteAttachOperation(IntEnum):
    DEFAULT = 0
    RESTORE_FACTORY = 1


class LteAttachRoaming(IntEnum):
    HOME = 0
    PARTNER = 1
    NON_PARTNER = 2


class ContextSource(IntEnum):
    ADMIN = 0
    USER = 1
    OPERATOR = 2
    MODEM = 3
    DEVICE = 4


class LteAttachState(IntEnum):
    DETACHED = 0
    ATTACHED = 1


# ---------------------------------------------------------------------------------- structs

PROVIDER = InfoLayout("MbimProvider", (
    string("ProviderId"), u32("ProviderState", ProviderState), string("ProviderName"),
    u32("CellularClass", CellularClass), u32("Rssi"), u32("ErrorRate"),
))
PIN_DESC = InfoLayout("MbimPinDesc", (
    u32("PinMode", PinMode), u32("PinFormat", PinFormat), u32("PinLengthMin"),
    u32("PinLengthMax"),
))
IPV4_ELEMENT = InfoLayout("MbimIPv4Element", (u32("OnLinkPrefixLength"), ipv4("IPv4Address")))
IPV6_ELEMENT = InfoLayout("MbimIPv6Element", (u32("OnLinkPrefixLength"), ipv6("IPv6Address")))
DEVICE_SERVICE_ELEMENT = InfoLayout("MbimDeviceServiceElement", (
    uuid("DeviceServiceId"), u32("DssPayload"), u32("MaxDssInstances"), u32("CidsCount"),
    u32_array("Cids", count="CidsCount"),
))
EVENT_ENTRY = InfoLayout("MbimEventEntry", (
    uuid("DeviceServiceId"), u32("CidsCount"), u32_array("Cids", count="CidsCount"),
))
CONTEXT = InfoLayout("MbimContext", (
    u32("ContextId"), uuid("ContextType"), string("AccessString"), string("UserName"),
    string("Password"), u32("Compression", Compression), u32("AuthProtocol", AuthProtocol),
))
PIN_DESC_NAMES = (
    "PinDescPin1", "PinDescPin2", "PinDescDeviceSimPin", "PinDescDeviceFirstSimPin",
    "PinDescNetworkPin", "PinDescNetworkSubsetPin", "PinDescServiceProviderPin",
    "PinDescCorporatePin", "PinDescSubsidyLock", "PinDescCustom",
)


# ------------------------------------------------------------------------------------- CIDs


@dataclass(frozen=True)
class CidSpec:
    service: Service
    cid: int
    name: str
    set: InfoLayout | None = None
    query: InfoLayout | None = None
    response: InfoLayout | None = None
    notification: InfoLayout | None = None

    def request(self, command_type: int) -> InfoLayout | None:
        """The host's payload layout for a command type; None if the CID has no such command."""
        if command_type == CommandType.SET:
            return self.set
        if command_type == CommandType.QUERY:
            return self.query
        return None


def _providers(name: str) -> InfoLayout:
    return InfoLayout(name, (u32("ProvidersCount"),
                         ref_struct_array("Providers", PROVIDER, count="ProvidersCount")))


DEVICE_CAPS = InfoLayout("DeviceCaps", (
    u32("DeviceType", DeviceType), u32("CellularClass", CellularClass),
    u32("VoiceClass", VoiceClass), u32("SimClass", SimClass), u32("DataClass", DataClass),
    u32("SmsCaps", SmsCaps), u32("ControlCaps", ControlCaps), u32("MaxSessions"),
    string("CustomDataClass"), string("DeviceId"), string("FirmwareInfo"),
    string("HardwareInfo"),
))
SUBSCRIBER_READY_STATUS = InfoLayout("SubscriberReadyStatus", (
    u32("ReadyState", ReadyState), string("SubscriberId"), string("SimIccId"), u32("ReadyInfo"),
    u32("TelephoneNumbersCount"), string_array("TelephoneNumbers", count="TelephoneNumbersCount"),
))
RADIO_STATE_SET = InfoLayout("RadioStateSet", (u32("RadioState", RadioState),))
RADIO_STATE = InfoLayout("RadioState", (u32("HwRadioState", RadioState),
                                        u32("SwRadioState", RadioState)))
PIN_SET = InfoLayout("PinSet", (u32("PinType", PinType), u32("PinOperation", PinOperation),
                                string("Pin"), string("NewPin")))
PIN_INFO = InfoLayout("PinInfo", (u32("PinType", PinType), u32("PinState", PinState),
                                  u32("RemainingAttempts")))
PIN_LIST = InfoLayout("PinList", tuple(inline_struct(n, PIN_DESC) for n in PIN_DESC_NAMES))
HOME_PROVIDER = InfoLayout("HomeProvider", (inline_struct("Provider", PROVIDER),))
PREFERRED_PROVIDERS = _providers("PreferredProviders")
VISIBLE_PROVIDERS_QUERY = InfoLayout("VisibleProvidersQuery",
                                     (u32("Action", VisibleProvidersAction),))
VISIBLE_PROVIDERS = _providers("VisibleProviders")
REGISTER_STATE_SET = InfoLayout("RegisterStateSet", (
    string("ProviderId"), u32("RegisterAction", RegisterAction), u32("DataClass", DataClass),
))
REGISTER_STATE = InfoLayout("RegistrationState", (
    u32("NwError"), u32("RegisterState", RegisterState), u32("RegisterMode", RegisterMode),
    u32("AvailableDataClasses", DataClass), u32("CurrentCellularClass", CellularClass),
    string("ProviderId"), string("ProviderName"), string("RoamingText"),
    u32("RegistrationFlag", RegistrationFlag),
))
PACKET_SERVICE_SET = InfoLayout("PacketServiceSet",
                                (u32("PacketServiceAction", PacketServiceAction),))
PACKET_SERVICE = InfoLayout("PacketService", (
    u32("NwError"), u32("PacketServiceState", PacketServiceState),
    u32("HighestAvailableDataClass", DataClass),
    u64("UplinkSpeed"), u64("DownlinkSpeed"),
))
SIGNAL_STATE_SET = InfoLayout("SignalStateSet", (
    u32("SignalStrengthInterval"), u32("RssiThreshold"), u32("ErrorRateThreshold"),
))
SIGNAL_STATE = InfoLayout("SignalState", (
    u32("Rssi"), u32("ErrorRate"), u32("SignalStrengthInterval"), u32("RssiThreshold"),
    u32("ErrorRateThreshold"),
))
CONNECT_SET = InfoLayout("ConnectSet", (
    u32("SessionId"), u32("ActivationCommand", ActivationCommand), string("AccessString"),
    string("UserName"), string("Password"), u32("Compression", Compression),
    u32("AuthProtocol", AuthProtocol), u32("IpType", IpType), uuid("ContextType"),
))
CONNECT = InfoLayout("Connect", (
    u32("SessionId"), u32("ActivationState", ActivationState),
    u32("VoiceCallState", VoiceCallState), u32("IpType", IpType), uuid("ContextType"),
    u32("NwError"),
))
PROVISIONED_CONTEXTS_SET = InfoLayout("ProvisionedContextsSet", (
    u32("ContextId"), uuid("ContextType"), string("AccessString"), string("UserName"),
    string("Password"), u32("Compression", Compression), u32("AuthProtocol", AuthProtocol),
    string("ProviderId"),
))
PROVISIONED_CONTEXTS = InfoLayout("ProvisionedContexts", (
    u32("ProvisionedContextsCount"),
    ref_struct_array("ProvisionedContexts", CONTEXT, count="ProvisionedContextsCount"),
))
SERVICE_ACTIVATION_SET = InfoLayout("ServiceActivationSet", (unsized_byte_array("Buffer"),))
SERVICE_ACTIVATION = InfoLayout("ServiceActivation", (u32("NwError"), unsized_byte_array("Buffer")))
IP_CONFIGURATION = InfoLayout("IpConfiguration", (
    u32("SessionId"), u32("IPv4ConfigurationAvailable", IpConfigAvailable),
    u32("IPv6ConfigurationAvailable", IpConfigAvailable),
    u32("IPv4AddressCount"), struct_array("IPv4Address", IPV4_ELEMENT, count="IPv4AddressCount"),
    u32("IPv6AddressCount"), struct_array("IPv6Address", IPV6_ELEMENT, count="IPv6AddressCount"),
    ref_ipv4("IPv4Gateway"), ref_ipv6("IPv6Gateway"),
    u32("IPv4DnsServerCount"), ipv4_array("IPv4DnsServer", count="IPv4DnsServerCount"),
    u32("IPv6DnsServerCount"), ipv6_array("IPv6DnsServer", count="IPv6DnsServerCount"),
    u32("IPv4Mtu"), u32("IPv6Mtu"),
))
DEVICE_SERVICES = InfoLayout("DeviceServices", (
    u32("DeviceServicesCount"), u32("MaxDssSessions"),
    ref_struct_array("DeviceServices", DEVICE_SERVICE_ELEMENT, count="DeviceServicesCount"),
))
DEVICE_SERVICE_SUBSCRIBE_LIST = InfoLayout("DeviceServiceSubscribeList", (
    u32("EventsCount"), ref_struct_array("Events", EVENT_ENTRY, count="EventsCount"),
))
PACKET_STATISTICS = InfoLayout("PacketStatistics", (
    u32("InDiscards"), u32("InErrors"), u64("InOctets"), u64("InPackets"), u64("OutOctets"),
    u64("OutPackets"), u32("OutErrors"), u32("OutDiscards"),
))
NETWORK_IDLE_HINT = InfoLayout("NetworkIdleHint", (u32("State"),))
EMERGENCY_MODE = InfoLayout("EmergencyMode", (u32("State"),))
PROXY_CONFIGURATION = InfoLayout("ProxyConfiguration", (string("DevicePath"), u32("Timeout")))

# SMS (libmbim data/mbim-service-sms.json). PDUs are 3GPP TS 23.040 TPDUs preceded by the SMSC
# address (TS 27.005 PDU mode), as ModemManager writes and reads them.
SMS_CONFIGURATION_SET = InfoLayout("SmsConfigurationSet", (
    u32("Format", SmsFormat), string("ScAddress")))
SMS_CONFIGURATION = InfoLayout("SmsConfiguration", (
    u32("SmsStorageState", SmsStorageState), u32("Format", SmsFormat), u32("MaxMessages"),
    u32("CdmaShortMessageSize"), string("ScAddress")))
SMS_PDU_READ_RECORD = InfoLayout("MbimSmsPduReadRecord", (
    u32("MessageIndex"), u32("MessageStatus", SmsStatus), ref_byte_array("PduData")))
SMS_READ_QUERY = InfoLayout("SmsReadQuery", (
    u32("Format", SmsFormat), u32("Flag", SmsFlag), u32("MessageIndex")))
# The model answers in PDU format only, so the CDMA array of libmbim's layout never appears.
SMS_READ = InfoLayout("SmsRead", (
    u32("Format", SmsFormat), u32("MessagesCount"),
    ref_struct_array("PduMessages", SMS_PDU_READ_RECORD, count="MessagesCount")))
# SEND's record is a struct of its own written inline, its offsets counted from the record's
# start (libmbim's "struct" field): the handler decodes it with SMS_PDU_SEND_RECORD.
SMS_SEND_SET = InfoLayout("SmsSendSet", (u32("Format", SmsFormat), unsized_byte_array("Record")))
SMS_PDU_SEND_RECORD = InfoLayout("MbimSmsPduSendRecord", (ref_byte_array("PduData"),))
SMS_SEND = InfoLayout("SmsSend", (u32("MessageReference"),))
SMS_DELETE_SET = InfoLayout("SmsDeleteSet", (u32("Flag", SmsFlag), u32("MessageIndex")))
SMS_MESSAGE_STORE_STATUS = InfoLayout("SmsMessageStoreStatus", (
    u32("Flag", SmsStatusFlag), u32("MessageIndex")))

# USSD (data/mbim-service-ussd.json); the payload is coded as DataCodingScheme says (TS 23.038).
USSD_SET = InfoLayout("UssdSet", (
    u32("Action", UssdAction), u32("DataCodingScheme"), ref_byte_array("Payload")))
USSD = InfoLayout("Ussd", (
    u32("Response", UssdResponse), u32("SessionState", UssdSessionState),
    u32("DataCodingScheme"), ref_byte_array("Payload")))

# ATDS (data/mbim-service-atds.json): ModemManager 1.20 reads extended signal only from here.
ATDS_SIGNAL = InfoLayout("AtdsSignal", (
    u32("Rssi"), u32("ErrorRate"), u32("Rscp"), u32("Ecno"), u32("Rsrq"), u32("Rsrp"),
    u32("Rssnr")))

# MS Basic Connect Extensions (data/mbim-service-ms-basic-connect-extensions.json).
LTE_ATTACH_CONFIGURATION_ELEMENT = InfoLayout("MbimLteAttachConfiguration", (
    u32("IpType", IpType), u32("Roaming", LteAttachRoaming), u32("Source", ContextSource),
    string("AccessString"), string("UserName"), string("Password"),
    u32("Compression", Compression), u32("AuthProtocol", AuthProtocol)))
LTE_ATTACH_CONFIGURATION_SET = InfoLayout("LteAttachConfigurationSet", (
    u32("Operation", LteAttachOperation), u32("ConfigurationCount"),
    ref_struct_array("Configurations", LTE_ATTACH_CONFIGURATION_ELEMENT,
                     count="ConfigurationCount")))
LTE_ATTACH_CONFIGURATION = InfoLayout("LteAttachConfiguration", (
    u32("ConfigurationCount"),
    ref_struct_array("Configurations", LTE_ATTACH_CONFIGURATION_ELEMENT,
                     count="ConfigurationCount")))
LTE_ATTACH_INFO = InfoLayout("LteAttachInfo", (
    u32("LteAttachState", LteAttachState), u32("IpType", IpType), string("AccessString"),
    string("UserName"), string("Password"), u32("Compression", Compression),
    u32("AuthProtocol", AuthProtocol)))
SYS_CAPS = InfoLayout("SysCaps", (
    u32("NumberOfExecutors"), u32("NumberOfSlots"), u32("Concurrency"), u64("ModemId")))

BC = Service.BASIC_CONNECT


class BasicConnect(IntEnum):
    DEVICE_CAPS = 1
    SUBSCRIBER_READY_STATUS = 2
    RADIO_STATE = 3
    PIN = 4
    PIN_LIST = 5
    HOME_PROVIDER = 6
    PREFERRED_PROVIDERS = 7
    VISIBLE_PROVIDERS = 8
    REGISTER_STATE = 9
    PACKET_SERVICE = 10
    SIGNAL_STATE = 11
    CONNECT = 12
    PROVISIONED_CONTEXTS = 13
    SERVICE_ACTIVATION = 14
    IP_CONFIGURATION = 15
    DEVICE_SERVICES = 16
    DEVICE_SERVICE_SUBSCRIBE_LIST = 19
    PACKET_STATISTICS = 20
    NETWORK_IDLE_HINT = 21
    EMERGENCY_MODE = 22
    MULTICARRIER_PROVIDERS = 24


class Sms(IntEnum):
    CONFIGURATION = 1
    READ = 2
    SEND = 3
    DELETE = 4
    MESSAGE_STORE_STATUS = 5


class Ussd(IntEnum):
    USSD = 1


class Atds(IntEnum):
    SIGNAL = 1


class MsBasicConnectExtensions(IntEnum):
    LTE_ATTACH_CONFIGURATION = 3
    LTE_ATTACH_INFO = 4
    SYS_CAPS = 5


class IntelFirmwareUpdate(IntEnum):
    MODEM_REBOOT = 1


class ProxyControl(IntEnum):
    CONFIGURATION = 1


_B = BasicConnect
CIDS: tuple[CidSpec, ...] = (
    CidSpec(BC, _B.DEVICE_CAPS, "DEVICE_CAPS", query=EMPTY, response=DEVICE_CAPS),
    CidSpec(BC, _B.SUBSCRIBER_READY_STATUS, "SUBSCRIBER_READY_STATUS", query=EMPTY,
            response=SUBSCRIBER_READY_STATUS, notification=SUBSCRIBER_READY_STATUS),
    CidSpec(BC, _B.RADIO_STATE, "RADIO_STATE", set=RADIO_STATE_SET, query=EMPTY,
            response=RADIO_STATE, notification=RADIO_STATE),
    CidSpec(BC, _B.PIN, "PIN", set=PIN_SET, query=EMPTY, response=PIN_INFO),
    CidSpec(BC, _B.PIN_LIST, "PIN_LIST", query=EMPTY, response=PIN_LIST),
    CidSpec(BC, _B.HOME_PROVIDER, "HOME_PROVIDER", set=HOME_PROVIDER, query=EMPTY,
            response=HOME_PROVIDER),
    CidSpec(BC, _B.PREFERRED_PROVIDERS, "PREFERRED_PROVIDERS", set=PREFERRED_PROVIDERS,
            query=EMPTY, response=PREFERRED_PROVIDERS, notification=PREFERRED_PROVIDERS),
    CidSpec(BC, _B.VISIBLE_PROVIDERS, "VISIBLE_PROVIDERS", query=VISIBLE_PROVIDERS_QUERY,
            response=VISIBLE_PROVIDERS),
    CidSpec(BC, _B.REGISTER_STATE, "REGISTER_STATE", set=REGISTER_STATE_SET, query=EMPTY,
            response=REGISTER_STATE, notification=REGISTER_STATE),
    CidSpec(BC, _B.PACKET_SERVICE, "PACKET_SERVICE", set=PACKET_SERVICE_SET, query=EMPTY,
            response=PACKET_SERVICE, notification=PACKET_SERVICE),
    CidSpec(BC, _B.SIGNAL_STATE, "SIGNAL_STATE", set=SIGNAL_STATE_SET, query=EMPTY,
            response=SIGNAL_STATE, notification=SIGNAL_STATE),
    # libmbim sends the CONNECT query in the response's shape, with SessionId filled in.
    CidSpec(BC, _B.CONNECT, "CONNECT", set=CONNECT_SET, query=CONNECT, response=CONNECT,
            notification=CONNECT),
    CidSpec(BC, _B.PROVISIONED_CONTEXTS, "PROVISIONED_CONTEXTS", set=PROVISIONED_CONTEXTS_SET,
            query=EMPTY, response=PROVISIONED_CONTEXTS, notification=PROVISIONED_CONTEXTS),
    CidSpec(BC, _B.SERVICE_ACTIVATION, "SERVICE_ACTIVATION", set=SERVICE_ACTIVATION_SET,
            response=SERVICE_ACTIVATION),
    # The IP_CONFIGURATION query is the response's 60-byte shape with only SessionId set.
    CidSpec(BC, _B.IP_CONFIGURATION, "IP_CONFIGURATION", query=IP_CONFIGURATION,
            response=IP_CONFIGURATION, notification=IP_CONFIGURATION),
    CidSpec(BC, _B.DEVICE_SERVICES, "DEVICE_SERVICES", query=EMPTY, response=DEVICE_SERVICES),
    CidSpec(BC, _B.DEVICE_SERVICE_SUBSCRIBE_LIST, "DEVICE_SERVICE_SUBSCRIBE_LIST",
            set=DEVICE_SERVICE_SUBSCRIBE_LIST, response=DEVICE_SERVICE_SUBSCRIBE_LIST),
    CidSpec(BC, _B.PACKET_STATISTICS, "PACKET_STATISTICS", query=EMPTY,
            response=PACKET_STATISTICS),
    CidSpec(BC, _B.NETWORK_IDLE_HINT, "NETWORK_IDLE_HINT", set=NETWORK_IDLE_HINT, query=EMPTY,
            response=NETWORK_IDLE_HINT),
    CidSpec(BC, _B.EMERGENCY_MODE, "EMERGENCY_MODE", query=EMPTY, response=EMERGENCY_MODE,
            notification=EMERGENCY_MODE),
    CidSpec(BC, _B.MULTICARRIER_PROVIDERS, "MULTICARRIER_PROVIDERS", set=PREFERRED_PROVIDERS,
            query=EMPTY, response=PREFERRED_PROVIDERS, notification=PREFERRED_PROVIDERS),
    CidSpec(Service.SMS, Sms.CONFIGURATION, "SMS_CONFIGURATION", set=SMS_CONFIGURATION_SET,
            query=EMPTY, response=SMS_CONFIGURATION, notification=SMS_CONFIGURATION),
    CidSpec(Service.SMS, Sms.READ, "SMS_READ", query=SMS_READ_QUERY, response=SMS_READ,
            notification=SMS_READ),
    CidSpec(Service.SMS, Sms.SEND, "SMS_SEND", set=SMS_SEND_SET, response=SMS_SEND),
    CidSpec(Service.SMS, Sms.DELETE, "SMS_DELETE", set=SMS_DELETE_SET, response=EMPTY),
    CidSpec(Service.SMS, Sms.MESSAGE_STORE_STATUS, "SMS_MESSAGE_STORE_STATUS", query=EMPTY,
            response=SMS_MESSAGE_STORE_STATUS, notification=SMS_MESSAGE_STORE_STATUS),
    CidSpec(Service.USSD, Ussd.USSD, "USSD", set=USSD_SET, response=USSD, notification=USSD),
    CidSpec(Service.ATDS, Atds.SIGNAL, "ATDS_SIGNAL", query=EMPTY, response=ATDS_SIGNAL),
    CidSpec(Service.MS_BASIC_CONNECT_EXTENSIONS, MsBasicConnectExtensions.LTE_ATTACH_CONFIGURATION,
            "LTE_ATTACH_CONFIGURATION", set=LTE_ATTACH_CONFIGURATION_SET, query=EMPTY,
            response=LTE_ATTACH_CONFIGURATION, notification=LTE_ATTACH_CONFIGURATION),
    CidSpec(Service.MS_BASIC_CONNECT_EXTENSIONS, MsBasicConnectExtensions.LTE_ATTACH_INFO,
            "LTE_ATTACH_INFO", query=EMPTY, response=LTE_ATTACH_INFO,
            notification=LTE_ATTACH_INFO),
    CidSpec(Service.MS_BASIC_CONNECT_EXTENSIONS, MsBasicConnectExtensions.SYS_CAPS, "SYS_CAPS",
            query=EMPTY, response=SYS_CAPS),
    CidSpec(Service.INTEL_FIRMWARE_UPDATE, IntelFirmwareUpdate.MODEM_REBOOT, "MODEM_REBOOT",
            set=EMPTY, response=EMPTY),
    # libmbim-private: what a client sends to mbim-proxy first; answered with an empty success.
    CidSpec(Service.PROXY_CONTROL, ProxyControl.CONFIGURATION, "CONFIGURATION",
            set=PROXY_CONFIGURATION, response=EMPTY),
)

_BY_KEY = {(spec.service, spec.cid): spec for spec in CIDS}


def lookup(service: Service, cid: int) -> CidSpec | None:
    return _BY_KEY.get((service, cid))
