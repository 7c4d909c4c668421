"""`python -m hftrain ...` and `accelerate launch -m hftrain ...` start here."""

from hftrain.cli import main

if __name__ == "__main__":
    main()
