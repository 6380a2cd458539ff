"""The host side of the IP MUX on channel 0 (Contract 2 of docs/architecture.md): the sans-IO
`scheduler.MuxScheduler` (sessions, the uplink scheduler, flow control, DL dispatch) and its
asyncio adapter `host.MuxHost` (channel 0, command round trips, the event loop). The codecs it
shares with the model are in `iosm_cuse.wire.mux`."""
