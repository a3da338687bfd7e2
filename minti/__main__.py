from minti.cli import main

raise SystemExit(main())
