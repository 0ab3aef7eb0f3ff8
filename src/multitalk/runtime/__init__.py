"""multitalk.runtime layer."""
