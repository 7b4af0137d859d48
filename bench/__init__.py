"""Benchmarks: scripts that measure and print figures; never run by the tests."""
