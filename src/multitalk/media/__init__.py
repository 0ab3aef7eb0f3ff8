"""multitalk.media layer."""
