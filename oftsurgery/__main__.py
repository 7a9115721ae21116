"""`python -m oftsurgery` runs the same CLI as the `oftsurgery` console script."""

from oftsurgery.cli import main

if __name__ == "__main__":
    main()
