"""The fuzz suite (a package, so that its server fixture lives as long as
the package's tests: see conftest.py)."""
