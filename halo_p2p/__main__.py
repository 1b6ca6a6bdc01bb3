from halo_p2p.cli.main import main

raise SystemExit(main())
