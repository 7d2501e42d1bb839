"""Benchmarks behind ``medimesh bench …``: each returns a JSON-able dict."""
