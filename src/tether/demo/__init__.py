"""`tether demo`: the whole promise, end to end, in one command."""
