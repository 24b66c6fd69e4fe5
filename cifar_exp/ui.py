"""``python -m cifar_exp.ui``: see ``cifar_exp.cli.ui_main``."""

if __name__ == "__main__":
    from cifar_exp.cli import ui_main

    raise SystemExit(ui_main())
