"""Workload identity: bearer JWT -> Principal (see issue: identity and policies)."""
