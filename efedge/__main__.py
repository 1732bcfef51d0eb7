from efedge.cli import main

raise SystemExit(main())
