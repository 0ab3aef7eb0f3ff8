"""multitalk.models layer."""
