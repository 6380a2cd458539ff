"""The UML tier: the kernel's own iosm driver, in a User-Mode Linux kernel, drives the modem
model served as a virt-pci function (docs/uml-virtpci.md). Run with `python3 -m tests.uml`."""
