"""Speculative decoding: drafters propose tokens, one target pass verifies them (`runtime.speculative.verify`), and
the caches drop what was rejected by the caller's lengths alone (`runtime.backend.Backend.verify`).  Torch-free."""
