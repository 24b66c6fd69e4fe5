"""``python -m cifar_exp.compare``: the best trials of a sweep side by side."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("compare"))
