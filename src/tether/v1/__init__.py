"""Generated from protos/tether/v1 by `make proto`. Do not edit."""
