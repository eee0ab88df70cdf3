"""Small shared utilities (logging with rank prefixes, process memory)."""
