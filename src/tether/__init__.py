"""Tether: bounded, observable, recoverable execution for multi-agent systems."""

__version__ = "0.1.0"
