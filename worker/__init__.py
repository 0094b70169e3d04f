"""shipmon: a monitor for 247Express shipments."""
