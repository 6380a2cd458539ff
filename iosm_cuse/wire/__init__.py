"""What crosses the bus, declared once as data and shared by the host driver and the modem model:
the fixed-record mechanism (`record`), the IPC structures (`ipc`: scratchpad, doorbells, context
info, ring messages, TDs), the channel table (`channels`), the MUX Lite and Aggregation codecs
(`mux`), and the one mechanism for counting rejected untrusted input (`rejects`).

Pure: this package imports nothing outside itself and the standard library, and knows nothing of
which side of the bus it runs on."""
