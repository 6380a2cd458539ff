"""How the driver meets the rest of the system: the udev monitor messages that announce its
ports to ModemManager, and the small D-Bus client that watches for ModemManager."""
