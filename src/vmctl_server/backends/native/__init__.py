"""The C fast paths through cffi: /proc parsers, the reply encoder, the advice loop."""
