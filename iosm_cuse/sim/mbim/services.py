"""The services besides BASIC_CONNECT that ModemManager uses (docs/modemmanager.md §7): SMS,
USSD, ATDS SIGNAL (its extended signal), three MS Basic Connect Extensions CIDs, and the
Intel Firmware Update service's MODEM_REBOOT. Each table is listed in DEVICE_SERVICES.

Requests arrive decoded by ``iosm_cuse/mbim/cids.py`` (enum values already checked); the state
is the ``ModemState``'s (``modem.py``, ``sms.py``).
"""

from __future__ import annotations

from iosm_cuse.mbim.cids import (
    SMS_PDU_SEND_RECORD,
    Atds,
    IntelFirmwareUpdate,
    LteAttachOperation,
    MsBasicConnectExtensions,
    Sms,
    SmsFormat,
    Ussd,
)
from iosm_cuse.mbim.constants import CommandType, Status
from iosm_cuse.mbim.infobuf import InfoBufferError, decode
from iosm_cuse.mbim.uuids import Service
from iosm_cuse.sim.mbim.handlers import Answer, FunctionContext, ServiceHandlers, Values
from iosm_cuse.sim.mbim.modem import Change, Indication, _default_lte_attach
from iosm_cuse.sim.mbim.sms import SmsError

SET, QUERY = CommandType.SET, CommandType.QUERY
MAX_LTE_ATTACH_CONFIGURATIONS = 3   # home, partner, non-partner

SMS = ServiceHandlers(Service.SMS)
USSD = ServiceHandlers(Service.USSD)
ATDS = ServiceHandlers(Service.ATDS)
MS_BASIC_CONNECT_EXTENSIONS = ServiceHandlers(Service.MS_BASIC_CONNECT_EXTENSIONS)
INTEL_FIRMWARE_UPDATE = ServiceHandlers(Service.INTEL_FIRMWARE_UPDATE)
TABLES = (SMS, USSD, ATDS, MS_BASIC_CONNECT_EXTENSIONS, INTEL_FIRMWARE_UPDATE)


def _answer(result: Change | Values, indications: tuple[Indication, ...] = ()) -> Answer:
    if isinstance(result, Change):
        return Answer(result.status)
    return Answer(Status.NONE, result, indications)


# SMS -----------------------------------------------------------------------------------------


@SMS.handles(Sms.CONFIGURATION)
def sms_configuration(fn: FunctionContext, ct: int, req: Values) -> Answer:
    store = fn.modem.sms
    if ct == SET:
        if req["Format"] is not SmsFormat.PDU:
            return Answer(Status.INVALID_PARAMETERS)   # a GSM modem: PDU mode only
        store.smsc = req["ScAddress"]
    return Answer(Status.NONE, store.configuration_values())


@SMS.handles(Sms.READ)
def sms_read(fn: FunctionContext, ct: int, req: Values) -> Answer:
    if req["Format"] is not SmsFormat.PDU:
        return Answer(Status.INVALID_PARAMETERS)
    return _answer(fn.modem.sms_read(req["Flag"], req["MessageIndex"]))


@SMS.handles(Sms.SEND)
def sms_send(fn: FunctionContext, ct: int, req: Values) -> Answer:
    if req["Format"] is not SmsFormat.PDU:
        return Answer(Status.INVALID_PARAMETERS)
    modem = fn.modem
    refused = modem.attach_refusal()
    if refused is not None:
        return Answer(refused)
    try:
        record = decode(SMS_PDU_SEND_RECORD, req["Record"])
        reference = modem.sms.send(record["PduData"])
    except (InfoBufferError, SmsError):
        return Answer(Status.INVALID_PARAMETERS)
    return Answer(Status.NONE, {"MessageReference": reference})


@SMS.handles(Sms.DELETE)
def sms_delete(fn: FunctionContext, ct: int, req: Values) -> Answer:
    try:
        fn.modem.sms.delete(req["Flag"], req["MessageIndex"])
    except SmsError:
        return Answer(Status.INVALID_PARAMETERS)
    return Answer(Status.NONE, {})


@SMS.handles(Sms.MESSAGE_STORE_STATUS)
def sms_message_store_status(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return Answer(Status.NONE, fn.modem.sms.store_status_values())


# USSD ----------------------------------------------------------------------------------------


@USSD.handles(Ussd.USSD)
def ussd(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return _answer(fn.modem.ussd_request(req["Action"], req["DataCodingScheme"], req["Payload"]))


# ATDS ----------------------------------------------------------------------------------------


@ATDS.handles(Atds.SIGNAL)
def atds_signal(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return Answer(Status.NONE, fn.modem.atds_signal_values())


# MS Basic Connect Extensions -----------------------------------------------------------------

X = MsBasicConnectExtensions


@MS_BASIC_CONNECT_EXTENSIONS.handles(X.LTE_ATTACH_CONFIGURATION)
def lte_attach_configuration(fn: FunctionContext, ct: int, req: Values) -> Answer:
    modem = fn.modem
    indications: tuple[Indication, ...] = ()
    if ct == SET:
        if req["Operation"] is LteAttachOperation.RESTORE_FACTORY:
            modem.lte_attach_configurations = _default_lte_attach()
        else:
            configs = req["Configurations"]
            if not 1 <= len(configs) <= MAX_LTE_ATTACH_CONFIGURATIONS:
                return Answer(Status.INVALID_PARAMETERS)
            modem.lte_attach_configurations = [dict(c) for c in configs]
        indications = (Indication(Service.MS_BASIC_CONNECT_EXTENSIONS,
                                  X.LTE_ATTACH_CONFIGURATION, _lte_values(fn)),)
    return Answer(Status.NONE, _lte_values(fn), indications)


def _lte_values(fn: FunctionContext) -> Values:
    return {"Configurations": [dict(c) for c in fn.modem.lte_attach_configurations]}


@MS_BASIC_CONNECT_EXTENSIONS.handles(X.LTE_ATTACH_INFO)
def lte_attach_info(fn: FunctionContext, ct: int, req: Values) -> Answer:
    return Answer(Status.NONE, fn.modem.lte_attach_info_values())


@MS_BASIC_CONNECT_EXTENSIONS.handles(X.SYS_CAPS)
def sys_caps(fn: FunctionContext, ct: int, req: Values) -> Answer:
    # One modem, one SIM slot, one executor; ModemId: the IMEI as a number.
    device_id = fn.modem.config.device_id
    return Answer(Status.NONE, {"NumberOfExecutors": 1, "NumberOfSlots": 1, "Concurrency": 1,
                                "ModemId": int(device_id) if device_id.isdigit() else 0})


# Intel Firmware Update -----------------------------------------------------------------------


@INTEL_FIRMWARE_UPDATE.handles(IntelFirmwareUpdate.MODEM_REBOOT)
def modem_reboot(fn: FunctionContext, ct: int, req: Values) -> Answer:
    # Answered first; the device drops off the bus just after (MbimFunction.request_reboot).
    fn.request_reboot()
    return Answer(Status.NONE, {})
