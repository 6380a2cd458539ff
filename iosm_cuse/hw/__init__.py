"""Host side of the IOSM IPC protocol: the Bus, its backends, the layouts and the engine."""
