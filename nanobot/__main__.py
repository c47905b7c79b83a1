"""``python -m nanobot``: the service and its commands."""

from nanobot.cli import main

main()
