"""Hash-chained, HMAC-ed audit trail (see issue: audit trail)."""
