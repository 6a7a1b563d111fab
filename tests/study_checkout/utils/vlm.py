"""The transport of the stand-in checkout (it holds no system text)."""
