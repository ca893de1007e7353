"""lobsterd: one microVM per tenant, isolated from the host and from each other."""

__version__ = "0.3.0"
