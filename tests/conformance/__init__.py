"""SGLang conformance checks against a live server (see conftest.py)."""
