"""`python -m oftsurgery` runs the same CLI as the `oftsurgery` console script."""

from oftsurgery.cli import run

if __name__ == "__main__":
    run()
