"""``python -m cifar_exp.rerun RUN_ID`` or ``NAME --trial N``: rerun a logged trial and compare
it with the original (see ``cifar_exp.rerun``)."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("rerun"))
