"""Fixtures the interop tests share: `certs` (a certificate for 127.0.0.1 from a
throwaway CA, and a client context trusting it) for the apps they run under uvicorn."""

from _uvicorn import certs

__all__ = ["certs"]
