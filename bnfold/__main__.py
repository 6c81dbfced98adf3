"""``python -m bnfold`` runs the command line (see :mod:`bnfold.cli`)."""

from bnfold.cli import main

if __name__ == "__main__":
    main()
