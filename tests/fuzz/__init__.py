"""A grammar-aware fuzzer for the ``.qc`` parser: ``generate.py`` makes inputs, ``run.py``
checks them. ``python -m tests.fuzz --cases 100000`` prints the figures."""
