"""multitalk.service layer."""
