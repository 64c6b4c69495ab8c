"""Where bytes rest: versioned artifacts, the encrypted file format, encrypted tables."""
