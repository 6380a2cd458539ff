"""The medium between the host driver and the device: the Bus interface (`base`: BAR0/BAR2,
DMA memory with DMA addresses, interrupts and doorbells) and its backends — shared memory with
the modem model process (`shm`, both ends), a UIO-bound PCI device (`uio`, driver end, with the
sysfs discovery of `pci`). A device-end backend (virt-pci for a UML kernel) goes here too.

Knows nothing of the IOSM protocol carried over it."""
