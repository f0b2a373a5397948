from reaper.launch import main

raise SystemExit(main())
