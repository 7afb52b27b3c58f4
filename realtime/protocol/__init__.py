"""Wire formats, pure and I/O-free: generated protobuf, frame codecs, error and close codes."""
