"""Code that builds the embedded world's models (the tiny teacher); not part of the installed library."""
