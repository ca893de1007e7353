"""Pure logic: no I/O here, so everything is unit-tested without root."""
