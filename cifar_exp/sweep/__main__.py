"""``python -m cifar_exp.sweep NAME``: run or resume a sweep (see ``cifar_exp.cli``)."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("sweep"))
