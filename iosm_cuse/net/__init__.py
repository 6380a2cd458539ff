"""IP packets and the TUN devices that carry them, used alike by the host's links and by the
modem model's packet gateway: TUN creation and offloads (`tun`), Internet checksums, TCP
segmentation and receive coalescing (`gso`).

Knows nothing of the modem, the bus or MBIM."""
