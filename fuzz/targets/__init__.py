"""Fuzz targets: each module exposes ``fuzz_one(data: bytes) -> None`` and ``seeds() -> list[bytes]``."""
