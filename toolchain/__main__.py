import sys

try:
    from toolchain.cli import main
except KeyboardInterrupt:  # Ctrl-C while the (light) CLI module itself loads
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
