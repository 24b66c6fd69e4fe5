"""``python -m cifar_exp.report NAME``: rebuild a study's plots, trials table and cost ledger."""

if __name__ == "__main__":
    from cifar_exp.cli import command

    raise SystemExit(command("report"))
