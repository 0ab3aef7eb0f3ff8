"""multitalk: MeiGen-MultiTalk that just works.

Layers (each imports only the layers to its left):
media -> models -> runtime -> pipeline -> service / cli / ui
"""

__version__ = "0.1.0"
