"""The node runtime: the agent-facing Broker on a Unix socket, talking to the control plane."""
