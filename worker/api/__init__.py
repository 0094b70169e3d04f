"""The HTTP API: merchant backends register and read shipments over HTTPS (SPEC §7)."""
