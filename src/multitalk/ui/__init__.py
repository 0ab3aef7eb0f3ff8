"""multitalk.ui layer."""
