"""``gradstream bench``: the service against the plain PyTorch loop and a raw gRPC byte stream."""
