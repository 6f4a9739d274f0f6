"""Any program as a Tether agent: `tether run` and the `tether mcp` stdio bridge."""
