"""The modem model as a PCI function of a User-Mode Linux kernel: PCI over virtio, vhost-user
(docs/uml-virtpci.md).

- `vhost_user.py`: the vhost-user message codec and the device end's session state (pure);
- `virtqueue.py`: split virtqueues over the front end's memory (pure);
- `pcidev.py`: the virtio_pcidev messages, the config space, the function's answers (pure);
- `device.py`: `VirtPciBus` (the Bus the model runs on) and `DeviceEnd` (one connection);
- `server.py`: the asyncio adapter on its own thread.
"""
