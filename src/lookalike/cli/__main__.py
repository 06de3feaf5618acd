"""``python -m lookalike.cli``: the ``lookalike`` command."""

from lookalike.cli import main

# Guarded: spawned decoder processes import this module again as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
