"""iosm-cuse: a userspace IOSM driver for Intel M.2 PCIe modems, and a model of the modem."""

__version__ = "0.1.0"
