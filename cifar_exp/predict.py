"""``python -m cifar_exp.predict IMAGE...``: top-k classes of image files from a registered model."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("predict"))
