import sys

try:  # importing the CLI pulls in torch, seconds of work: a Ctrl-C there is an ordinary stop
    from minti.cli import main
except KeyboardInterrupt:
    print("minti: interrupted while starting; nothing was done", file=sys.stderr)
    raise SystemExit(130)

raise SystemExit(main())
