"""Envoy ext_proc: the Endpoint Picker Protocol. `session` is the per-stream state machine (messages in,
messages out, no I/O); `grpc_server` is the transport seam."""
