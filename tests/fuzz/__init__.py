"""The fuzz suite of issue 9 (a package, so that its server fixture lives as long as
the package's tests: see conftest.py)."""
