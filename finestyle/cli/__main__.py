"""`python -m finestyle.cli`: the library's commands (without the flow commands run and demo)."""

from finestyle.cli.app import main

main()
