"""The sender service."""
