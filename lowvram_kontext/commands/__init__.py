"""One module per subcommand; each has ``register(subparsers)``, adding its parser and setting ``run``."""
