"""Planning before paying: ``--dry-run --target=NAME`` compiles a mode's real step for the
slice it names, without its devices, and says whether it fits (docs/PLANNING.md)."""
