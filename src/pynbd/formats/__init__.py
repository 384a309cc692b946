"""On-disk formats shared by plugins, filters and tools (pure byte parsers)."""
