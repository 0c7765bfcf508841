"""Sweeps: many models measured as units of work (``sweep``: config, planning, local or Ray workers) committed to
a resumable SQLite store (``store``)."""
