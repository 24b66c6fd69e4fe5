"""``python -m cifar_exp.register NAME``: register a sweep's best model and promote it by alias."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("register"))
