"""``python -m cifar_exp.compare``: see ``cifar_exp.cli.compare_main``."""

if __name__ == "__main__":
    from cifar_exp.cli import compare_main

    raise SystemExit(compare_main())
