"""Thin adapters between bytes on the wire and the node: WebSocket, HTTP."""
