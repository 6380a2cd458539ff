"""The host side of the IOSM IPC protocol: the sans-IO ring and TD logic (`protocol`), the asyncio
engine that drives it from interrupts and timers (`engine`), and the host MUX (`mux`).

Host only: the modem model never imports this package; what both sides share is in `wire/`."""
