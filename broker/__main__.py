"""``python -m broker`` runs the CLI."""

from broker.cli import main

if __name__ == "__main__":
    main()
