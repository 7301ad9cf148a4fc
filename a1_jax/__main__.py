from a1_jax.cli import main

raise SystemExit(main())
