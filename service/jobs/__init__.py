"""The Jobs API: the servicer that cuts uploads into queued chunks, per-item errors, stream
slots, the server's sweep."""
