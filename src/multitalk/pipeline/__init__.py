"""multitalk.pipeline layer."""
