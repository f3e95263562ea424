"""The `alignment` command (and `python -m alignment`): restarts once with a caching allocator, then runs the CLI.

The restart comes before anything heavy is imported, so it costs a fraction of a second (see
`alignment.allocator` for why CPU runs want one).
"""

import sys


def main() -> None:
    from alignment.allocator import restart_with_caching_allocator

    restart_with_caching_allocator()
    from alignment.notices import quiet_known_notices

    quiet_known_notices()  # before anything imports bitsandbytes
    from alignment.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
