"""File I/O that never leaves half-written artifacts and never unpickles untrusted code."""
