"""Document pipelines on datatrove, shared by curate and dedup: executors, reader/writer steps, funnel stats."""
