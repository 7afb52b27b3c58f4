"""Server API for backends: publish, broadcast, history, channels, disconnect."""
