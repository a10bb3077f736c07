"""lit-recover's command line: ``python main.py fit --config configs/recover.yaml --model.pruned_model …``."""

from lit_recover.cli import run_cli


def cli_main(args=None):
    """Build and run the LightningCLI (``args`` as a list for tests; ``None`` reads ``sys.argv``)."""
    return run_cli(args)


if __name__ == "__main__":
    cli_main()
