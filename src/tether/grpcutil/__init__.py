"""gRPC plumbing shared by both servers and the clients."""
