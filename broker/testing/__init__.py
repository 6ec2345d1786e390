"""Test helpers shipped with the broker: real local servers, settings, signers.

Users run their own workloads' tests against these, and the broker's own test
suite and ``broker dev`` use the same code.
"""
