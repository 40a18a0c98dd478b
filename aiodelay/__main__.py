from aiodelay._cli import main

raise SystemExit(main())
