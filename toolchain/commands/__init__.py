"""One module per CLI verb; each exposes ``register(subparsers)`` and ``run(args)``."""
