from aiodelay.server import main

raise SystemExit(main())
