"""Generated gRPC stubs for ``isthmus.federation.v1`` (regenerate: ``python -m federation.proto.gen``)."""
