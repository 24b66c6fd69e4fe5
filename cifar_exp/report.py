"""``python -m cifar_exp.report NAME``: rebuild a study's plots, trials table and cost ledger."""

if __name__ == "__main__":
    from cifar_exp.cli import report_main

    raise SystemExit(report_main())
