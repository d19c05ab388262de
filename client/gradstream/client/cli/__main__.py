"""``python -m gradstream.client.cli``: the ``gradstream`` command."""

from gradstream.client.cli import main

main()
