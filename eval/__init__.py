"""Rate-distortion and sample-quality evaluation against classic codecs."""
