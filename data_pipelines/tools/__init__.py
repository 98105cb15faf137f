"""the `kakehashi data` and `kakehashi bench data` commands: converters, verify, inspect, preview."""
