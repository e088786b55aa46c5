"""Mirror of ``opacus.utils`` for the names dpkit's Opacus drop-in provides."""
