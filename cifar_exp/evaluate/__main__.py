"""``python -m cifar_exp.evaluate MODEL_URI``: a fresh test-set evaluation run of a model."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("evaluate"))
