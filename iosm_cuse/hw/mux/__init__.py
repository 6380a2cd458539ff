"""The IP MUX of channel 0: codecs shared with the modem model (`codec`) and the host side
sessions with flow control (`host.MuxHost`, Contract 2 of docs/architecture.md)."""
