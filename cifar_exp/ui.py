"""``python -m cifar_exp.ui``: the MLflow UI on this project's store."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("ui"))
