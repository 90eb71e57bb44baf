"""The Redis job queue, both sides: keys, Lua scripts, the job store, value types, packing,
progress, depth, and the consumer that works its streams."""
