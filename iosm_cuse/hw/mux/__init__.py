"""The host side of the IP MUX on channel 0: sessions, the uplink scheduler and flow control
(`host.MuxHost`, Contract 2 of docs/architecture.md). The codecs it shares with the model are in
`iosm_cuse.wire.mux`."""
