"""Realtime gateway: WebSocket and MQTT clients in one hub of channels."""

__version__ = "0.1.0"
