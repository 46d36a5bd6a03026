"""Research instruments, not packaged and not part of the product (research/README.md)."""
