"""``python -m cifar_exp COMMAND [ARGS]``: every command, as ``cifar-exp COMMAND`` (see ``cifar_exp.cli``)."""

if __name__ == "__main__":
    from cifar_exp.cli import main

    raise SystemExit(main())
