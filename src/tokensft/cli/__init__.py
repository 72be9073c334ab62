"""`tokensft <verb>`: each verb is a module with `add_parser(subparsers)` and `main(args)`; nothing imports cli."""
