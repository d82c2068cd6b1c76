"""Serving commands: frames and their encodings, standing queries, the one config, and the pipeline's stages."""
