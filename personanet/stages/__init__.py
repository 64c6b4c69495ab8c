"""The pipeline's stages and what they share (fingerprint, reuse, lock, commit)."""
