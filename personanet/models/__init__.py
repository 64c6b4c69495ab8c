"""Model families: what a network is, how it is built, saved and loaded."""
