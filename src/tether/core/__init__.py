"""Pure domain logic: no grpc, no generated code, no I/O."""
