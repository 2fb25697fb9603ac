"""gRPC serving (`adaserve.v1.Generation`): proto stubs, servicer, server app, metrics.

This layer knows nothing of jax: it talks to an `Engine` only through `make_request`,
`submit`, `output`, `service` and a few attributes (DESIGN.md §2).
"""
