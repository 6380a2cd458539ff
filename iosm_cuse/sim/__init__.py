"""The modem model: the CP side of the IOSM IPC protocol and its channel functions."""
