"""The pure-Python twins of the native back-end (--no-native)."""
